// A till of the PouchDB system in scripts/bench_peers.py: a local LevelDB PouchDB in live,
// retrying two-way replication with the edge. stdin "sale ID SKU" -> put, then "ack ID"
// (LevelDB without fsync). Prints "seen ID" for every other till's sale that arrives.
// Usage: node pouch_till.js DATA_DIR EDGE_DB_URL TILL_NAME
'use strict';
const PouchDB = require('pouchdb-node');
const readline = require('readline');
const [dir, remote, me] = process.argv.slice(2);
const mine = me + '-';
const db = new PouchDB(dir + '/till');
let out = [];
function flush() { if (out.length) { process.stdout.write(out.join('')); out = []; } }
db.changes({ since: 'now', live: true }).on('change', (c) => {
  if (!c.id.startsWith(mine)) { out.push('seen ' + c.id + '\n'); setImmediate(flush); }
});
let ready = false;
db.sync(remote, { live: true, retry: true }).on('paused', () => {
  if (!ready) { ready = true; process.stdout.write('ready\n'); }
}).on('error', (e) => { process.stderr.write('sync error ' + e + '\n'); });
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const [cmd, id, sku] = line.split(' ');
  if (cmd !== 'sale') return;
  db.put({ _id: id, sku: sku, qty: 1 }).then(() => {
    out.push('ack ' + id + '\n'); setImmediate(flush);
  }, (e) => { out.push('err ' + id + '\n'); setImmediate(flush); });
});
