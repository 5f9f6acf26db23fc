"""A hopeit app with the prediction service's name, payload types and server settings but none of its work:
`bench_service.py --floor` measures what a request costs below the service (see `predict`)."""
