"""The agent on each alarm post: button in, strobe and siren out, events to the server over MQTT."""
