"""cellcloud: a self-hostable serverless platform for unmodified AWS Lambda functions."""

__version__ = "0.1.0"
