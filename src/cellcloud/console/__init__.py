"""The web console (issue #16): pages and their JSON reads, served by the router under
``/console/`` to the region's operator. See docs/observability.md."""
