// node-postgres (pg) through the proxy: node pg.js URL TABLE
'use strict';
const pg = require('pg');
const { check, skip, expect, expectCode, backendsNote, Stealer, BACKEND, PRIMARY, args, done, setNote } = require('./common');

async function main() {
  const { url, table: t } = args();
  const client = new pg.Client({ connectionString: url });
  let connected = false;
  await check('connect', async () => {
    await client.connect();
    connected = true;
    const r = await client.query('select current_user as u');
    expect('current_user', 'authenticated', r.rows[0].u);
  });
  if (!connected) return;

  await check('crud', async () => {
    await client.query(`insert into ${t} (id, name, qty) values ($1, $2, $3)`, [1, 'one', 1]);
    let r = await client.query(`select name, qty from ${t} where id = $1`, [1]);
    expect('row', { name: 'one', qty: 1 }, r.rows[0]);
    r = await client.query(`update ${t} set qty = qty + $1 where id = $2`, [41, 1]);
    expect('updated rows', 1, r.rowCount);
    r = await client.query(`select qty from ${t} where id = $1`, [1]);
    expect('qty after update', 42, r.rows[0].qty);
    r = await client.query(`delete from ${t} where id = $1`, [1]);
    expect('deleted rows', 1, r.rowCount);
    r = await client.query(`select count(*)::int as n from ${t} where id = 1`);
    expect('rows after delete', 0, r.rows[0].n);
  });

  await check('rollback', async () => {
    await client.query('BEGIN');
    await client.query(`insert into ${t} (id, name, qty) values ($1, $2, $3)`, [2, 'two', 2]);
    let r = await client.query(`select count(*)::int as n from ${t} where id = 2`);
    expect('rows inside the transaction', 1, r.rows[0].n);
    await client.query('ROLLBACK');
    r = await client.query(`select count(*)::int as n from ${t} where id = 2`);
    expect('rows after rollback', 0, r.rows[0].n);
  });

  // Named statements ({name, text, values}) are parsed once per connection
  // and reused. After every other round other connections take the
  // backend the insert ran on, so the next round runs on another one.
  await check('prepared', async () => {
    const st = new Stealer(url);
    try {
      const ins = new Set();
      const all = new Set();
      for (let i = 1; i <= 8; i++) {
        let r = await client.query({ name: 'compat_ins', text: `insert into ${t} (id, name, qty) values ($1, $2, $3) returning ${BACKEND} as b`, values: [100 + i, `p${i}`, i] });
        const be = r.rows[0].b;
        ins.add(be);
        all.add(be);
        for (const j of [100 + i, 101]) {
          r = await client.query({ name: 'compat_sel', text: `select name, ${BACKEND} as b from ${t} where id = $1`, values: [j] });
          expect('name', `p${j - 100}`, r.rows[0] && r.rows[0].name);
          all.add(r.rows[0].b);
        }
        if (st.began) await st.release();
        else if (i % 2 === 1) await st.steal(be);
      }
      backendsNote(ins, all, st.steals);
    } finally {
      await st.close();
    }
  });

  await check('error_then_ok', async () => {
    await expectCode(client.query('select 1/0'), '22012');
    let r = await client.query('select 1 as one');
    expect('after the error', 1, r.rows[0].one);
    await client.query('BEGIN');
    await expectCode(client.query('select * from no_such_table'), '42P01');
    await expectCode(client.query('select 1'), '25P02');
    await client.query('ROLLBACK');
    r = await client.query({ name: 'compat_two', text: 'select $1::int as two', values: [2] });
    expect('after the rollback', 2, r.rows[0].two);
  });

  // SET, then other connections take the backend this client ran on.
  await check('search_path', async () => {
    await client.query('SET search_path TO myschema, public');
    const be = (await client.query(`${PRIMARY}select ${BACKEND} as b`)).rows[0].b;
    const st = new Stealer(url);
    try {
      await st.steal(be);
      let r = await client.query(`${PRIMARY}select v, ${BACKEND} as b from compat_marker`);
      expect('compat_marker.v', 'myschema', r.rows[0].v);
      expect('compat_marker.v (no hint)', 'myschema', (await client.query('select v from compat_marker')).rows[0].v);
      setNote(`(SET on ${be}, next transaction on ${r.rows[0].b})`);
      r = await client.query('show search_path');
      expect('show search_path', 'myschema, public', r.rows[0].search_path);
    } finally {
      await st.close();
      await client.query('RESET search_path');
    }
  });

  skip('copy', 'node-postgres has no COPY API of its own (pg-copy-streams is not a dependency)');
  skip('cancel', 'node-postgres has no built-in query cancel');
  await client.end();
}

main().then(done, (e) => { console.log(`check main FAIL ${e}`); process.exitCode = 1; });
