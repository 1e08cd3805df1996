"""WebSocket client for the Kubernetes channel protocols (v4/v5.channel.k8s.io, base64 variants,
portforward.k8s.io), on aiohttp's client. Independent of shimd.streaming."""

from __future__ import annotations

import asyncio
import base64
import json
from collections import defaultdict
from dataclasses import dataclass, field

import aiohttp


class WsRejected(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"websocket upgrade rejected with HTTP {status}")
        self.status = status


@dataclass
class ChannelClient:
    session: aiohttp.ClientSession
    ws: aiohttp.ClientWebSocketResponse
    protocol: str
    messages: list[tuple[int, bytes]] = field(default_factory=list)  # every message, in order

    @property
    def b64(self) -> bool:
        return "base64" in self.protocol

    @classmethod
    async def connect(cls, url: str, protocols: list[str], timeout: float = 10) -> ChannelClient:
        ws_url = url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(timeout):
                ws = await session.ws_connect(ws_url, protocols=protocols, autoping=True, max_msg_size=0)
        except aiohttp.WSServerHandshakeError as e:
            await session.close()
            raise WsRejected(e.status) from None
        except BaseException:
            await session.close()
            raise
        return cls(session, ws, ws.protocol or "")

    async def send(self, channel: int, data: bytes) -> None:
        if self.b64:
            await self.ws.send_str(chr(ord("0") + channel) + base64.b64encode(data).decode())
        else:
            await self.ws.send_bytes(bytes([channel]) + data)

    async def close_channel(self, channel: int) -> None:
        """v5 only: tell the server we will send nothing more on channel (stdin half-close)."""
        await self.ws.send_bytes(bytes([255, channel]))

    async def receive(self, timeout: float = 30) -> tuple[int, bytes] | None:
        """Next channel message; None once the server has closed the connection."""
        async with asyncio.timeout(timeout):
            msg = await self.ws.receive()
        if msg.type == aiohttp.WSMsgType.BINARY:
            item = (msg.data[0], bytes(msg.data[1:]))
        elif msg.type == aiohttp.WSMsgType.TEXT:
            item = (ord(msg.data[0]) - ord("0"), base64.b64decode(msg.data[1:]))
        else:
            return None
        self.messages.append(item)
        return item

    async def collect(self, timeout: float = 30) -> dict[int, bytes]:
        """Everything per channel until the server closes."""
        out: dict[int, bytearray] = defaultdict(bytearray)
        async with asyncio.timeout(timeout):
            while (item := await self.receive(timeout)) is not None:
                out[item[0]] += item[1]
        return {k: bytes(v) for k, v in out.items()}

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


def status_of(raw: bytes) -> dict[str, object]:
    parsed: dict[str, object] = json.loads(raw)
    return parsed
