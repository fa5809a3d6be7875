"""Position: gpsd client, fixes, track history."""
