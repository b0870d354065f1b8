"""cellcloud's queues: the subset of Amazon SQS (JSON protocol) that boto3's ``sqs`` client
needs for dead-letter and destination queues, kept per cell in SQLite."""
