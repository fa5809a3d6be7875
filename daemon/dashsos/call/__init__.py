"""The call: WHIP-shaped signalling, the aiortc peer, tracks, talk-back."""
