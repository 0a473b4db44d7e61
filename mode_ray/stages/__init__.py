"""Stage drivers: where the plain algorithms are wired into Ray Data, Train and Serve."""
