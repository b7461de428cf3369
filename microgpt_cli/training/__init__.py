"""The training loop, its optimizers, the processes of a distributed run and the events it reports."""
