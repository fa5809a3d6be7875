"""Encoded packets, the ring buffer, and the video and audio sources."""
