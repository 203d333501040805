-- The fleet's shared API request budget: a token bucket per name, one row each.
-- tokens is what is left at updated_at (Unix seconds); it refills at the caller's rate.
CREATE TABLE rate_budget (
    name       text PRIMARY KEY,
    tokens     double precision NOT NULL,
    updated_at double precision NOT NULL
);
