"""HTTP routes: thin; the work is in `app.service` and `app.batching`."""
