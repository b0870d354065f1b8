def handler(event, context):
    print(f"adding {event['a']} and {event['b']} in {context.function_name}")
    return {"sum": event["a"] + event["b"]}
