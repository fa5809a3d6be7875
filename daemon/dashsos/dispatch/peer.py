"""aiortc answerers the way the desk needs them: ICE from [ice], H.264 first, whole answers.

aiortc does not trickle: `setLocalDescription` gathers every candidate, so the answer
returned here is complete and goes out in one HTTP response, as WHIP wants.
"""

from __future__ import annotations

from aiortc import RTCPeerConnection, RTCRtpSender, RTCRtpTransceiver, RTCSessionDescription
from aiortc import sdp as aiortc_sdp

from dashsos.call.ice import ice_configuration
from dashsos.config import IceConfig
from dashsos.dispatch.sdp import filter_candidates


class OfferError(ValueError):
    """An offer the desk cannot answer; the text says why, for the 400 response."""


def new_peer(ice: IceConfig) -> RTCPeerConnection:
    # Always an explicit server list: aiortc asks a public STUN server when given none.
    return RTCPeerConnection(ice_configuration(ice))


def prefer(transceiver: RTCRtpTransceiver, mime_type: str) -> None:
    """Negotiate `mime_type` (video/H264, audio/opus) and nothing else (but its
    retransmissions): the desk records and relays media as it was encoded, so it takes
    only what an MP4 and a browser take. An offer without it fails to be answered.

    An answerer must do this before setRemoteDescription: that is where aiortc picks
    the codecs the answer will carry.
    """
    codecs = RTCRtpSender.getCapabilities(transceiver.kind).codecs
    transceiver.setCodecPreferences(
        [c for c in codecs if c.mimeType.lower() == mime_type.lower()]
        + [c for c in codecs if c.mimeType.lower().endswith("/rtx")])


def check_offer(offer: str) -> aiortc_sdp.SessionDescription:
    """Parse `offer` the way aiortc will, so a bad one is refused before anything starts."""
    try:
        description = aiortc_sdp.SessionDescription.parse(offer)
    except Exception as exc:  # aiortc's parser raises whatever the bad line trips
        raise OfferError(f"cannot parse the SDP offer: {exc!r}") from exc
    if not any(m.kind in ("audio", "video") for m in description.media):
        raise OfferError("the offer has no audio or video section")
    for media in description.media:
        if media.ice is None or not media.ice.usernameFragment or media.dtls is None:
            raise OfferError(f"the {media.kind} section has no ICE credentials or DTLS "
                             "fingerprint")
    return description


def has_data_channel(description: aiortc_sdp.SessionDescription) -> bool:
    return any(m.kind == "application" for m in description.media)


async def answer(pc: RTCPeerConnection, offer: str, allowed: tuple[str, ...]) -> str:
    """Apply a complete (non-trickled) offer and return the complete answer."""
    offer = filter_candidates(offer, allowed, complete=True)
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as exc:  # aiortc raises ValueError, OperationError, InternalError...
        raise OfferError(f"cannot answer the offer: {exc}") from exc
    return str(pc.localDescription.sdp)
