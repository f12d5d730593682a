"""Local tooling: `make run-local` (moto + a mail catcher + the SQS runner) and LocalStack.

Nothing here is used by the Lambda function; it needs the dev dependencies (moto, aiosmtpd).
This file and `localstack.py` import only the standard library, so `make localstack` can run
them with any Python 3.11 before the project's virtualenv exists.
"""
