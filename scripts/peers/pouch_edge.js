// The PouchDB edge of scripts/bench_peers.py: express-pouchdb over LevelDB (pouchdb-node).
// Prints "ready PORT" when listening and "seen ID" for every sale in its database; stdin
// "bytes" -> "bytes N": TCP payload bytes read + written on all its connections so far
// (PouchDB's replication sends "Connection: close", so a socket sampler misses most).
// Usage: node pouch_edge.js DATA_DIR
'use strict';
const PouchDB = require('pouchdb-node');
const dir = process.argv[2];
const P = PouchDB.defaults({ prefix: dir + '/' });
let out = [];
function flush() { if (out.length) { process.stdout.write(out.join('')); out = []; } }
// express-pouchdb is itself an (express 4) app: mounting it in another express breaks
// its routes under express 5.
const app = require('express-pouchdb')(P, { mode: 'minimumForPouchDB', inMemoryConfig: true,
  logPath: dir + '/log.txt' });
const db = new P('store');
db.info().then(() => {
  db.changes({ since: 'now', live: true }).on('change', (c) => {
    out.push('seen ' + c.id + '\n'); setImmediate(flush);
  });
  const srv = app.listen(0, '127.0.0.1', () => {
    process.stdout.write('ready ' + srv.address().port + '\n');
  });
  let closedBytes = 0;
  const open = new Set();
  srv.on('connection', (sock) => {
    open.add(sock);
    sock.on('close', () => { closedBytes += sock.bytesRead + sock.bytesWritten; open.delete(sock); });
  });
  require('readline').createInterface({ input: process.stdin }).on('line', (line) => {
    if (line.trim() !== 'bytes') return;
    let n = closedBytes;
    for (const sock of open) n += sock.bytesRead + sock.bytesWritten;
    out.push('bytes ' + n + '\n'); setImmediate(flush);
  });
});
