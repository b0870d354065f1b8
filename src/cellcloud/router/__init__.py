"""The router: the region's thin, stateless front door."""
