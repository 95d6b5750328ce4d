//! A PostgreSQL row held `FOR UPDATE` by a transaction of the test's own:
//! a condition a test can hold and release, where waiting on the clock
//! would race (a batch job that must still be running when a cancel lands).

use sqlx::Transaction;
use sqlx::postgres::{PgPool, PgPoolOptions, Postgres};

/// A row locked `FOR UPDATE` until [`RowLock::release`]. Another session's
/// `UPDATE` of it, or `SELECT ... FOR UPDATE` reaching it, waits until then.
pub struct RowLock {
    tx: Transaction<'static, Postgres>,
    pool: PgPool,
}

impl RowLock {
    /// Locks row `id` of `table` (a name the test writes, never input).
    /// Panics when PostgreSQL cannot be reached or the row does not exist:
    /// a lock on nothing would hold nothing.
    pub async fn take(url: &str, table: &str, id: i64) -> RowLock {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .unwrap_or_else(|e| panic!("connect to PostgreSQL to lock a row: {e}"));
        let mut tx = pool
            .begin()
            .await
            .unwrap_or_else(|e| panic!("begin the locking transaction: {e}"));
        let locked: Option<i64> =
            sqlx::query_scalar(&format!("SELECT id FROM {table} WHERE id = $1 FOR UPDATE"))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .unwrap_or_else(|e| panic!("lock row {id} of {table}: {e}"));
        assert_eq!(locked, Some(id), "row {id} of {table} does not exist");
        RowLock { tx, pool }
    }

    /// Ends the transaction: whoever waits for the row goes on.
    pub async fn release(self) {
        self.tx
            .rollback()
            .await
            .unwrap_or_else(|e| panic!("release the row lock: {e}"));
        self.pool.close().await;
    }
}
