// Shared by the node clients of the matrix: each check prints one line,
// "check NAME ok ...", "check NAME FAIL reason" or "check NAME skip reason".
'use strict';

let failed = false;
let note = '';

async function check(name, fn) {
  note = '';
  const start = Date.now();
  let timer;
  try {
    await Promise.race([
      fn(),
      new Promise((_, reject) => { timer = setTimeout(() => reject(new Error('check timed out after 30s')), 30000); }),
    ]);
    console.log(`check ${name} ok ${Date.now() - start}ms ${note}`);
  } catch (e) {
    failed = true;
    const code = e && (e.code || (e.meta && e.meta.code)) ? ` (code ${e.code}${e.meta && e.meta.code ? ', ' + e.meta.code : ''})` : '';
    const msg = `${(e && e.name) || 'Error'}: ${(e && e.message) || e}${code}`;
    console.log(`check ${name} FAIL ${msg.split(/\s+/).join(' ')}`);
  } finally {
    clearTimeout(timer);
  }
}

function skip(name, reason) {
  console.log(`check ${name} skip ${reason}`);
}

function expect(what, want, got) {
  const w = JSON.stringify(want);
  const g = JSON.stringify(got);
  if (w !== g) throw new Error(`${what}: want ${w}, got ${g}`);
}

// expectCode awaits p and checks that it fails with SQLSTATE code (as pg
// reports it in err.code, TypeORM in err.driverError.code, Prisma in
// err.meta.code or err.cause).
async function expectCode(p, code) {
  try {
    await p;
  } catch (e) {
    const got = [e.code, e.driverError && e.driverError.code, e.meta && e.meta.code, e.meta && e.meta.driverAdapterError && e.meta.driverAdapterError.cause && e.meta.driverAdapterError.cause.originalCode];
    if (got.includes(code)) return e;
    throw new Error(`want SQLSTATE ${code}, got ${e.name}: ${e.message} ${JSON.stringify(got)}`);
  }
  throw new Error(`want SQLSTATE ${code}, got no error`);
}

// The backend a statement runs on: server port and pid.
const BACKEND = "inet_server_port()::text || ':' || pg_backend_pid()";
// Makes the proxy run a read on the primary (the search_path check steals
// primary backends).
const PRIMARY = '/* cascata:primary */ ';
const MAX_HOLDERS = 15; // below the project's pool_size (20)

function backendsNote(ins, all, steals) {
  note = `(insert ran on ${ins.size} primary backends, statements on ${all.size} backends, ${steals} steals)`;
  if (ins.size < 2) {
    throw new Error(`the prepared insert ran on one backend only ${JSON.stringify([...ins])}: re-preparing was not exercised`);
  }
}

// Stealer takes a backend away from the client under test, so that its next
// transaction must run on another one: it begins transactions on other
// node-postgres connections (explicit transactions run on the primary) until
// one runs on that backend, and holds them until release().
class Stealer {
  constructor(url) {
    this.url = url;
    this.holders = [];
    this.began = 0;
    this.steals = 0;
  }

  async steal(target) {
    const pg = require('pg');
    while (this.began < MAX_HOLDERS) {
      if (this.began === this.holders.length) {
        const c = new pg.Client({ connectionString: this.url });
        await c.connect();
        this.holders.push(c);
      }
      const h = this.holders[this.began++];
      await h.query('BEGIN');
      const r = await h.query(`select ${BACKEND} as b`);
      if (r.rows[0].b === target) {
        this.steals++;
        return;
      }
    }
  }

  async release() {
    for (const h of this.holders.slice(0, this.began)) await h.query('COMMIT');
    this.began = 0;
  }

  async close() {
    for (const h of this.holders) await h.end();
  }
}

function args() {
  const [url, table] = process.argv.slice(2);
  if (!url || !table) {
    console.error(`usage: node ${process.argv[1]} URL TABLE`);
    process.exit(2);
  }
  return { url, table };
}

function done() {
  process.exitCode = failed ? 1 : 0;
}

module.exports = { check, skip, expect, expectCode, backendsNote, Stealer, BACKEND, PRIMARY, args, done, setNote: (n) => { note = n; } };
