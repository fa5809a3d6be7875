"""What can open an incident: the local control socket (more to come: button, MQTT, GPS)."""
