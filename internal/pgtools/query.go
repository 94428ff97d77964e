package pgtools

import (
	"context"

	"github.com/jackc/pgx/v5"
)

// QueryStrings runs a query whose rows are one text column into *out.
func QueryStrings(ctx context.Context, c *pgx.Conn, out *[]string, sql string, args ...any) error {
	rows, err := c.Query(ctx, sql, args...)
	if err != nil {
		return err
	}
	vals, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return err
	}
	*out = vals
	return nil
}
