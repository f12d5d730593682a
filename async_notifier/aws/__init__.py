"""The AWS side: clients, S3 downloads, SQS feedback, the idempotency store, Cognito, secrets."""
