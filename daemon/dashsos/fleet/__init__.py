"""The fleet: MQTT client, topic contract, durable outbox, Home Assistant discovery."""
