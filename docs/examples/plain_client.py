"""A netlab client with nothing but the standard library (see docs/protocol.rst).

Usage: python plain_client.py HOST PORT USER KEY_FILE

Connects, says hello, authenticates with HMAC-SHA256 both ways, pings the
server and says bye.  Prints one line per step; exits 1 on any failure.
"""

import base64
import hashlib
import hmac
import json
import secrets
import socket
import struct
import sys


def send(sock, message):
    payload = json.dumps(message).encode("utf-8")
    sock.sendall(struct.pack(">I", len(payload)) + payload)


def receive_exactly(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("server closed the connection")
        data += chunk
    return data


def receive(sock):
    (length,) = struct.unpack(">I", receive_exactly(sock, 4))
    if length > 16 * 1024 * 1024:
        raise ConnectionError("frame too large")
    message = json.loads(receive_exactly(sock, length))
    if message["op"] == "error":
        raise RuntimeError(f"{message['code']}: {message['message']}")
    return message


def proof(key, label, server_nonce, client_nonce, user):
    text = label + server_nonce + client_nonce + user.encode("utf-8")
    return hmac.new(key, text, hashlib.sha256).digest()


def main(host, port, user, key_file):
    with open(key_file) as stream:
        key = base64.b64decode(stream.read().strip())
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        send(sock, {"op": "hello", "protocol": "netlab", "version": 1,
                    "max_frame": 16 * 1024 * 1024})
        hello = receive(sock)
        print(f"connected to the {hello['service']} service")
        server_nonce = base64.b64decode(hello["nonce"])
        client_nonce = secrets.token_bytes(32)
        mine = proof(key, b"netlab-client", server_nonce, client_nonce, user)
        send(sock, {"op": "auth", "mechanism": "hmac-sha256", "user": user,
                    "nonce": base64.b64encode(client_nonce).decode(),
                    "proof": base64.b64encode(mine).decode()})
        ready = receive(sock)
        theirs = proof(key, b"netlab-server", server_nonce, client_nonce, user)
        if not hmac.compare_digest(theirs, base64.b64decode(ready["proof"])):
            raise RuntimeError("the server did not prove it knows the key")
        print(f"authenticated as {ready['user']}; server proved the key")
        send(sock, {"op": "ping", "id": 1})
        print(f"ping answered: {receive(sock)['op']}")
        send(sock, {"op": "bye"})
        receive(sock)
        print("bye")


if __name__ == "__main__":
    try:
        main(*sys.argv[1:5])
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        print(f"plain_client: {error}", file=sys.stderr)
        sys.exit(1)
