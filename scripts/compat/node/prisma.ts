// Prisma 7 (prisma-client generator, WASM query compiler) through the
// PrismaPg driver adapter: node_modules/.bin/jiti prisma.ts URL compat_prisma
import { createHash } from 'node:crypto';
import pg from 'pg';
import { PrismaPg } from '@prisma/adapter-pg';
import { PrismaClient } from './node_modules/.compat-prisma/client';

const { check, skip, expect, expectCode, backendsNote, Stealer, BACKEND, args, done } = require('./common');

async function main() {
  const { url, table: t } = args();
  // statementNameGenerator makes the adapter send named statements
  // (node-postgres caches them per connection): what PgBouncer's
  // transaction mode breaks.
  const adapter = new PrismaPg(
    { connectionString: url, max: 1 },
    { statementNameGenerator: (q: { sql: string }) => 'prisma_' + createHash('sha1').update(q.sql).digest('hex').slice(0, 16) },
  );
  const prisma = new PrismaClient({ adapter });
  let ok = false;
  await check('connect', async () => {
    await prisma.$connect();
    const r: Array<{ u: string }> = await prisma.$queryRaw`select current_user::text as u`;
    expect('current_user', 'authenticated', r[0].u);
    ok = true;
  });
  if (!ok) return;

  await check('crud', async () => {
    await prisma.compatPrisma.create({ data: { id: 1, name: 'one', qty: 1 } });
    expect('row', { id: 1, name: 'one', qty: 1 }, await prisma.compatPrisma.findUnique({ where: { id: 1 } }));
    await prisma.compatPrisma.update({ where: { id: 1 }, data: { qty: { increment: 41 } } });
    expect('rows', [{ id: 1, name: 'one', qty: 42 }], await prisma.compatPrisma.findMany({ where: { id: { lt: 100 } } }));
    await prisma.compatPrisma.delete({ where: { id: 1 } });
    expect('rows after delete', 0, await prisma.compatPrisma.count({ where: { id: 1 } }));
  });

  await check('rollback', async () => {
    await expectRollback(prisma);
    expect('rows after rollback', 0, await prisma.compatPrisma.count({ where: { id: 2 } }));
    // A batch transaction and an interactive one that commit.
    await prisma.$transaction([
      prisma.compatPrisma.create({ data: { id: 3, name: 'three', qty: 3 } }),
      prisma.compatPrisma.update({ where: { id: 3 }, data: { qty: 4 } }),
    ]);
    await prisma.$transaction(async (tx) => {
      const row = await tx.compatPrisma.findUniqueOrThrow({ where: { id: 3 } });
      await tx.compatPrisma.update({ where: { id: 3 }, data: { qty: row.qty + 1 } });
    });
    expect('committed row', { id: 3, name: 'three', qty: 5 }, await prisma.compatPrisma.findUnique({ where: { id: 3 } }));
    await prisma.compatPrisma.delete({ where: { id: 3 } });
  });

  // The same named statements reused across transactions. After every
  // other round other connections take the backends of the adapter's pool
  // (one connection, so the locking read runs where the create did).
  await check('prepared', async () => {
    const st = new Stealer(url);
    try {
      const ins = new Set<string>();
      const all = new Set<string>();
      for (let i = 1; i <= 8; i++) {
        const created = await prisma.compatPrisma.create({ data: { id: 100 + i, name: `p${i}`, qty: i } });
        expect('created', `p${i}`, created.name);
        const r: Array<{ b: string }> = await prisma.$queryRawUnsafe(`select ${BACKEND} as b from compat_prisma where id = $1 for update`, 100 + i);
        ins.add(r[0].b);
        all.add(r[0].b);
        for (const j of [100 + i, 101]) {
          const row = await prisma.compatPrisma.findUnique({ where: { id: j } });
          expect('name', `p${j - 100}`, row && row.name);
        }
        if (st.began) await st.release();
        else if (i % 2 === 1) await st.steal(r[0].b);
      }
      backendsNote(ins, all, st.steals);
    } finally {
      await st.close();
    }
  });

  await check('error_then_ok', async () => {
    await expectCode(prisma.$queryRawUnsafe('select 1/0'), '22012');
    const r: Array<{ one: number }> = await prisma.$queryRaw`select 1::int as one`;
    expect('after the error', 1, r[0].one);
    await expectCode(prisma.compatPrisma.create({ data: { id: 101, name: 'dup', qty: 0 } }), 'P2002');
    const n = await prisma.compatPrisma.count({ where: { id: { gt: 100 } } });
    if (n !== 8) {
      // Tell a stale read from a wrong answer.
      const again = await prisma.compatPrisma.count({ where: { id: { gt: 100 } } });
      const raw: Array<{ n: number; b: string }> = await prisma.$queryRawUnsafe(`select count(*)::int as n, ${BACKEND} as b from compat_prisma where id > 100`);
      throw new Error(`after the unique violation: want 8 rows with id > 100, got ${n} (then ${again}; raw count ${raw[0].n} on ${raw[0].b})`);
    }
  });

  skip('search_path', 'Prisma has no session SET (it pools connections; the schema is qualified by the adapter\'s schema option)');
  skip('copy', 'Prisma has no COPY');
  skip('cancel', 'Prisma has no query cancel');
  await prisma.$disconnect();
}

async function expectRollback(prisma: PrismaClient) {
  try {
    await prisma.$transaction(async (tx) => {
      await tx.compatPrisma.create({ data: { id: 2, name: 'two', qty: 2 } });
      expect('rows inside the transaction', 1, await tx.compatPrisma.count({ where: { id: 2 } }));
      throw new Error('compat: roll back');
    });
  } catch (e) {
    if ((e as Error).message !== 'compat: roll back') throw e;
    return;
  }
  throw new Error('the transaction did not throw');
}

main().then(done, (e) => { console.log(`check main FAIL ${e}`); process.exitCode = 1; });
