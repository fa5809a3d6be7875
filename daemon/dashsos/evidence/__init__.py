"""Evidence on disk: the clip, its GPS sidecars and the incident record."""
