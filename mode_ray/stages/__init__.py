"""Stage drivers: where the plain algorithms are wired into Ray Data, Train, Tune and Serve."""
