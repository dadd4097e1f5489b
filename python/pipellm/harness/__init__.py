"""The benchmark and soak harness, kept apart from the library: model shapes and transfer
streams (`workloads`), their replay through the channel on a simulated device (`replay`,
behind `pipellm bench`), the long-running mixed check (`soak`, behind `pipellm soak`) and
plots of replay results (`plot`). They need the `bench` extra (numpy; `plot` also
matplotlib); nothing in the library imports them."""
