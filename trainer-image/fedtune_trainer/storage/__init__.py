"""Object storage: the Store interface with its file and S3 backends (`store`, `s3`), the
commit protocol and versioned state (`store`), the download cache for models and data (`cache`),
and from a URI to a store or a local path (`locate`)."""
