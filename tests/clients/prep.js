// node-postgres (npm pg) through geobouncer (transaction pooling), run by
// tests/integration/test_clients.py.
//
//   node prep.js HOST PORT DB USER PASSWORD CLIENTS ITERATIONS SCHEMA_PREFIX
//
// CLIENTS connections (pg.Client) work at once. Client i works in schema
// SCHEMA_PREFIX + i (SET search_path outside a transaction), sets its own
// statement_timeout and application_name, and uses named prepared queries
// ({name, text, values}): node-postgres sends Parse once per connection and then
// only Bind/Execute, under names ("ins", "sel" ...) that every client shares.
// Every row read is checked against what this client wrote, and every read
// checks the session settings; transactions use SET LOCAL, which must not
// outlive them. Prints "OK client=<i> rows=<n> sum=<s>" per client, or
// "FAIL client=<i> ..." and exits 1.

'use strict';

const { Client } = require('pg');

const [host, port, database, user, password, clientsArg, iterationsArg, prefix] = process.argv.slice(2);
if (!prefix) {
  console.error('usage: node prep.js HOST PORT DB USER PASSWORD CLIENTS ITERATIONS SCHEMA_PREFIX');
  process.exit(2);
}
const clients = Number(clientsArg);
const iterations = Number(iterationsArg);

function check(ok, id, what) {
  if (!ok) throw new Error(`client=${id}: ${what}`);
}

const SEL = {
  name: 'sel',
  text: "SELECT val, current_setting('search_path') AS sp, current_setting('statement_timeout') AS st," +
        " current_setting('application_name') AS app FROM items WHERE client = $1 AND seq = $2",
};
const SHOW = {
  name: 'show',
  text: "SELECT current_setting('statement_timeout') AS st, current_setting('search_path') AS sp",
};

async function runClient(id) {
  const schema = prefix + id;
  const ownTimeout = `${200 + id}s`;
  const app = `node-${id}`;
  const c = new Client({
    host, port: Number(port), database, user, password,
    application_name: app, connectionTimeoutMillis: 20000,
  });
  await c.connect();
  try {
    await c.query(`SET search_path = ${schema}`);
    await c.query(`SET statement_timeout = '${ownTimeout}'`);
    let sum = 0;
    for (let seq = 0; seq < iterations; seq++) {
      let val = `n${id}-${seq}`;
      const ins = await c.query({
        name: 'ins', text: 'INSERT INTO items (client, seq, val) VALUES ($1, $2, $3)', values: [id, seq, val],
      });
      check(ins.rowCount === 1, id, `insert seq=${seq}`);
      sum += seq;
      if (seq % 5 === 4) {
        // A transaction: SET LOCAL holds inside it and is gone after COMMIT.
        await c.query('BEGIN');
        await c.query("SET LOCAL statement_timeout = '66s'");
        const upd = await c.query({
          name: 'upd', text: 'UPDATE items SET val = val || $1 WHERE client = $2 AND seq = $3',
          values: ['+u', id, seq],
        });
        check(upd.rowCount === 1, id, `update seq=${seq}`);
        const inTx = await c.query({ ...SHOW, values: [] });
        check(inTx.rows[0].st === '66s', id, `SET LOCAL inside transaction: statement_timeout is ${inTx.rows[0].st}`);
        check(inTx.rows[0].sp === schema, id, `search_path inside transaction is ${inTx.rows[0].sp}`);
        await c.query('COMMIT');
        val += '+u';
      }
      const sel = await c.query({ ...SEL, values: [id, seq] });
      check(sel.rows.length === 1, id, `rows for seq=${seq}: ${sel.rows.length} in ${schema}`);
      const row = sel.rows[0];
      check(row.val === val, id, `row seq=${seq} is ${row.val}, want ${val}`);
      check(row.sp === schema, id, `search_path is ${row.sp}, want ${schema}`);
      check(row.st === ownTimeout, id, `statement_timeout is ${row.st}, want ${ownTimeout}`);
      check(row.app === app, id, `application_name is ${row.app}, want ${app}`);
    }
    await c.query('RESET statement_timeout');
    for (let k = 0; k < 5; k++) {
      const r = await c.query({ ...SHOW, values: [] });
      check(r.rows[0].st === '0', id, `after RESET statement_timeout is ${r.rows[0].st}`);
      check(r.rows[0].sp === schema, id, `after RESET search_path is ${r.rows[0].sp}`);
    }
    const cnt = await c.query({
      name: 'cnt',
      text: 'SELECT count(*)::int AS n, coalesce(sum(seq), 0)::int AS s,' +
            ' (count(*) FILTER (WHERE client <> $1))::int AS others FROM items',
      values: [id],
    });
    const { n, s, others } = cnt.rows[0];
    check(n === iterations, id, `rows in ${schema}: ${n}`);
    check(s === sum, id, `sum(seq) in ${schema}: ${s}`);
    check(others === 0, id, `rows of other clients in ${schema}: ${others}`);
    return `OK client=${id} rows=${n} sum=${s}`;
  } finally {
    await c.end();
  }
}

async function main() {
  const timer = setTimeout(() => {
    console.log('FAIL timeout: the clients did not finish in 150 s');
    process.exit(1);
  }, 150000);
  const results = await Promise.allSettled(Array.from({ length: clients }, (_, i) => runClient(i)));
  clearTimeout(timer);
  let failed = false;
  results.forEach((r, i) => {
    if (r.status === 'fulfilled') {
      console.log(r.value);
    } else {
      failed = true;
      console.log(`FAIL client=${i} ${r.reason && r.reason.stack ? r.reason.stack : r.reason}`);
    }
  });
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.log(`FAIL ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
