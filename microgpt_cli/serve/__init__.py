"""`microgpt serve`: the HTTP routes and the continuous batcher they decode through."""
