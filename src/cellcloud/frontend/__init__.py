"""A cell's frontend: the Lambda API for one cell, function metadata, placement, invoke path."""
