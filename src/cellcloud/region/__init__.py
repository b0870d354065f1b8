"""A region on one machine: the supervisor behind ``cellcloud up``."""
