"""Pure, sans-IO logic shared by the shells: no sockets, no clocks, no global randomness."""
