"""The other end of the call: the reference dispatcher and its web console.

Cars call in over WHIP-shaped HTTP (whip.py); the desk answers with aiortc (car.py),
records every call (recording.py) and relays it to operators' browsers (watcher.py),
whose voice goes back to the car (talkback.py). server.py puts it together.
"""
