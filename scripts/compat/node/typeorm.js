// TypeORM (postgres driver = node-postgres) through the proxy: node typeorm.js URL TABLE
'use strict';
require('reflect-metadata');
const { DataSource, EntitySchema } = require('typeorm');
const { check, skip, expect, expectCode, Stealer, BACKEND, PRIMARY, args, done, setNote } = require('./common');

async function main() {
  const { url, table: t } = args();
  // The entity, as plain JS (no decorators): the table exists already.
  const Item = new EntitySchema({
    name: 'Item',
    tableName: t,
    columns: {
      id: { type: 'int', primary: true },
      name: { type: 'text' },
      qty: { type: 'int' },
    },
  });
  const ds = new DataSource({ type: 'postgres', url, entities: [Item], synchronize: false, logging: false, poolSize: 4 });
  let ok = false;
  await check('connect', async () => {
    await ds.initialize();
    ok = true;
    const r = await ds.query('select current_user as u');
    expect('current_user', 'authenticated', r[0].u);
  });
  if (!ok) return;
  const repo = ds.getRepository(Item);

  await check('crud', async () => {
    await repo.save({ id: 1, name: 'one', qty: 1 });
    let row = await repo.findOneBy({ id: 1 });
    expect('row', { id: 1, name: 'one', qty: 1 }, row);
    await repo.update({ id: 1 }, { qty: 42 });
    row = await repo.findOneBy({ id: 1 });
    expect('qty after update', 42, row.qty);
    row.name = 'uno';
    await repo.save(row);
    expect('rows named uno', 1, await repo.countBy({ name: 'uno' }));
    const res = await repo.delete({ id: 1 });
    expect('deleted rows', 1, res.affected);
    expect('rows after delete', null, await repo.findOneBy({ id: 1 }));
  });

  await check('rollback', async () => {
    const qr = ds.createQueryRunner();
    await qr.connect();
    try {
      await qr.startTransaction();
      await qr.manager.getRepository(Item).insert({ id: 2, name: 'two', qty: 2 });
      expect('rows inside the transaction', 1, await qr.manager.getRepository(Item).countBy({ id: 2 }));
      await qr.rollbackTransaction();
    } finally {
      await qr.release();
    }
    expect('rows after rollback', 0, await repo.countBy({ id: 2 }));
    // And a committed one through DataSource.transaction.
    await ds.transaction(async (m) => {
      await m.getRepository(Item).insert({ id: 3, name: 'three', qty: 3 });
      await m.getRepository(Item).increment({ id: 3 }, 'qty', 1);
    });
    expect('committed row', { id: 3, name: 'three', qty: 4 }, await repo.findOneBy({ id: 3 }));
  });

  skip('prepared', 'TypeORM has no prepared-statement API (its queries are unnamed extended-protocol statements)');

  await check('error_then_ok', async () => {
    await expectCode(ds.query('select 1/0'), '22012');
    expect('after the error', [{ one: 1 }], await ds.query('select 1 as one'));
    const qr = ds.createQueryRunner();
    await qr.connect();
    try {
      await qr.startTransaction();
      await expectCode(qr.query('select * from no_such_table'), '42P01');
      await expectCode(qr.query('select 1'), '25P02');
      await qr.rollbackTransaction();
      expect('after the rollback', [{ two: 2 }], await qr.query('select 2 as two'));
    } finally {
      await qr.release();
    }
  });

  // Session state belongs to one connection: a QueryRunner holds one.
  // After the SET, other connections take the backend it ran on.
  await check('search_path', async () => {
    const qr = ds.createQueryRunner();
    await qr.connect();
    const st = new Stealer(url);
    try {
      await qr.query('SET search_path TO myschema, public');
      const be = (await qr.query(`${PRIMARY}select ${BACKEND} as b`))[0].b;
      await st.steal(be);
      const r = await qr.query(`${PRIMARY}select v, ${BACKEND} as b from compat_marker`);
      expect('compat_marker.v', 'myschema', r[0].v);
      expect('compat_marker.v (no hint)', [{ v: 'myschema' }], await qr.query('select v from compat_marker'));
      setNote(`(SET on ${be}, next transaction on ${r[0].b})`);
      expect('show search_path', [{ search_path: 'myschema, public' }], await qr.query('show search_path'));
    } finally {
      await st.close();
      await qr.query('RESET search_path').catch(() => {});
      await qr.release();
    }
  });

  skip('copy', 'TypeORM has no COPY API');
  skip('cancel', 'TypeORM has no query cancel (node-postgres has none built in)');
  await ds.destroy();
}

main().then(done, (e) => { console.log(`check main FAIL ${e}`); process.exitCode = 1; });
