"""Running the policy for asynchronous inference (SmolVLA paper §3.3): in-process, or on another machine.

infer_async.py needs one thing from a policy: compute(observation) -> {"actions": the next chunk, (n,
action_dim) in robot units}. `open_policy` gives it one of two such callables:

* in-process (the default): a `PolicyRunner`, the checkpoint loaded by `load_policy` behind a lock;
* remote (`--server HOST:PORT`): a `PolicyClient`, which sends the observation to a `PolicyServer` running
  on a GPU machine (`python infer_async.py --serve --policy CKPT`, handled by `serve`) and returns its answer.

Either runs on infer_async's `InferenceWorker` thread. Real-Time Chunking (flow.py): "rtc" (options)
and "rtc_leftover" (normalized) in an observation add "normalized" to the answer: the same chunk in the
policy's normalized units.

An observation is plain numpy: {"task": str, "observation.state": (S,) float32, "observation.images.<cam>":
(H, W, 3) uint8 camera frame}. Frames stay uint8 until the model turns them into floats in [0, 1]
(SmolVLA.prepare_images), so the wire, and the copy to the GPU, carry 4x fewer bytes.

The wire: one message = a 16-byte prefix + a JSON header + safetensors bytes. JSON and raw tensors only,
never pickle (a message cannot run code on the receiver), and both lengths in the prefix are checked
against limits before a single byte of the body is allocated or read.

This file imports numpy and safetensors only at its top: torch and the model are imported where a policy is
loaded or run (load_policy, PolicyRunner) or its options are added to a command line (add_policy_arguments),
and the servo driver (so100, pyserial) never.
"""

import argparse
import json
import socket
import socketserver
import struct
import sys
import threading
import time

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

# ----------------------------------------------------------------------------------------------------------
# 1. Wire protocol: one message = prefix + JSON header + safetensors bytes. Plain data only, never pickle.
# ----------------------------------------------------------------------------------------------------------
# prefix: magic b"SVLA", header length (uint32), tensor-bytes length (uint64), big-endian. Both lengths are
# checked against the limits before a single byte of the message body is allocated or read.

MAGIC = b"SVLA"
PREFIX = struct.Struct(">4sIQ")
MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


class ProtocolError(ValueError):
    """A message that does not follow the wire format (bad magic, too large, bad JSON or tensor bytes)."""


class RemoteError(RuntimeError):
    """The policy server answered with an error message."""


def encode_message(header, tensors=None):
    """header: JSON-serializable dict with a "type"; tensors: {name: numpy array} -> bytes."""
    header_bytes = json.dumps(header).encode()
    tensor_bytes = save_tensors(tensors) if tensors else b""
    return PREFIX.pack(MAGIC, len(header_bytes), len(tensor_bytes)) + header_bytes + tensor_bytes


def parse_prefix(prefix, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES):
    """Validate the 16-byte prefix -> (header length, tensor-bytes length)."""
    magic, header_len, tensor_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolError(f"not a smolvla message (magic {magic!r}, expected {MAGIC!r})")
    if header_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {header_len} bytes announced, limit {MAX_HEADER_BYTES}")
    if header_len + tensor_len > max_message_bytes:
        raise ProtocolError(f"message of {header_len + tensor_len} bytes announced, "
                            f"limit {max_message_bytes} "
                            f"(raise --max-message-mb on both sides if this is intended)")
    return header_len, tensor_len


def decode_body(header_bytes, tensor_bytes):
    """JSON header bytes + safetensors bytes -> (header dict, {name: numpy array})."""
    try:
        header = json.loads(header_bytes.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: [[[[...]]]]
        raise ProtocolError(f"message header is not valid JSON: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError(f"message header must be a JSON object with a string 'type', got {header!r:.200}")
    try:
        tensors = load_tensors(bytes(tensor_bytes)) if tensor_bytes else {}
    except (SafetensorError, ValueError) as e:
        raise ProtocolError(f"message tensors are not valid safetensors bytes: {e}") from None
    return header, tensors


def _recv_exact(sock, n, deadline):
    """Read exactly n bytes before the clock passes deadline (socket.timeout otherwise)."""
    buffer = bytearray(n)
    view = memoryview(buffer)
    got = 0
    while got < n:
        sock.settimeout(max(1e-3, deadline - time.monotonic()))
        received = sock.recv_into(view[got:])
        if received == 0:
            raise ConnectionError(f"peer closed the connection ({got} of {n} bytes received)")
        got += received
    return buffer


def send_message(sock, header, tensors=None, timeout_s=10.0):
    sock.settimeout(timeout_s)
    sock.sendall(encode_message(header, tensors))


def recv_message(sock, timeout_s=10.0, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES):
    """Read one message -> (header, tensors). Raises ProtocolError, ConnectionError or socket.timeout."""
    deadline = time.monotonic() + timeout_s
    header_len, tensor_len = parse_prefix(_recv_exact(sock, PREFIX.size, deadline), max_message_bytes)
    header_bytes = _recv_exact(sock, header_len, deadline)
    tensor_bytes = _recv_exact(sock, tensor_len, deadline)
    return decode_body(header_bytes, tensor_bytes)


# ----------------------------------------------------------------------------------------------------------
# 2. A loaded policy: observation in, chunk of actions out
# ----------------------------------------------------------------------------------------------------------


def load_policy(path, vlm=None, device="cpu", dtype="float32"):
    """A SmolVLA checkpoint (directory or hub id) ready for predict_chunk."""
    # torch is imported only where a policy runs: this file imports without it
    import torch

    import speed
    from policy import SmolVLAPolicy

    policy = SmolVLAPolicy.from_pretrained(path, vlm=vlm)
    policy = policy.to(device=torch.device(device), dtype=getattr(torch, dtype))
    # speed.py's inference steps, once the dtype is final (CPU: linear layers packed for oneDNN; same numbers)
    return speed.prepare(policy)


class PolicyRunner:
    """A loaded policy behind a lock: raw observation in, {"actions": (chunk, action_dim) float32 robot units}
    out, plus with an RTC request "normalized": the same chunk in the policy's normalized units (the next
    leftover). predict_chunk checks the observation (state shape, missing cameras) and moves it to the
    policy's device; only the frames' layout is checked here.
    """

    def __init__(self, policy, seed=None):
        self.policy = policy
        self.lock = threading.Lock()
        # what a client needs to know to drive this policy
        self.info = {"chunk_size": int(policy.config.chunk_size),
                     "cameras": list(policy.config.camera_keys),
                     "trained_on": dict(getattr(policy, "trained_on", {}))}  # fps, units, tasks (policy.py)
        # --seed: reproducible sampling noise
        self.rng = None
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def __call__(self, observation):
        import torch

        from smolvla import ACTION

        rtc = observation.get("rtc")
        options = self.rtc_options(rtc, observation.get("rtc_leftover")) if rtc is not None else {}
        if self.rng is not None:
            shape = (1, self.info["chunk_size"], self.policy.config.max_action_dim)
            options["noise"] = torch.from_numpy(self.rng.standard_normal(shape, dtype=np.float32))
        inputs = {**observation, "task": str(observation.get("task", ""))}
        for key in self.info["cameras"]:
            frame = observation.get(key)
            if frame is None:
                continue  # predict_chunk names the cameras it misses
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise ValueError(f"{key}: expected an (H, W, 3) uint8 frame, got {frame.dtype} {frame.shape}")
            inputs[key] = torch.from_numpy(frame).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W) uint8, a view
        # RTC: no_grad, since the guided sampler's vector-Jacobian product needs autograd
        # (inference_mode forbids it)
        if rtc is not None:
            autograd_mode = torch.no_grad()
        else:
            autograd_mode = torch.inference_mode()
        with self.lock, autograd_mode:
            chunk = self.policy.predict_chunk(inputs, **options)  # (1, chunk, action_dim)
            answer = {"actions": chunk[0].float().cpu().numpy()}
            if rtc is not None:
                answer["normalized"] = self.policy.normalize(ACTION, "ACTION", chunk)[0].float().cpu().numpy()
        return answer

    def rtc_options(self, rtc, leftover):
        """The sample_actions keywords for an observation's RTC request (none without a leftover: the first
        chunk, or after the queue ran dry, is sampled from noise alone)."""
        mode = rtc.get("mode")
        max_delay = getattr(self.policy, "trained_on", {}).get("rtc_max_delay", 0)
        if mode not in ("guided", "trained"):
            raise ValueError(f"unknown RTC mode {mode!r}: choose guided or trained (or off)")
        if mode == "trained" and not max_delay:
            raise ValueError("--rtc trained needs a policy trained with --rtc-max-delay "
                             "(trained_on.json says none)")
        if leftover is None or len(leftover) == 0:
            return {}
        # the request's options that sample_actions takes as they are
        passed_on = ("inference_delay", "execution_horizon", "schedule", "max_guidance_weight", "jacobian")
        options = {key: rtc[key] for key in passed_on if key in rtc}
        if mode == "trained":  # no guidance; the prefix no longer than the model saw in training
            options["jacobian"] = False
            options["inference_delay"] = min(int(options.get("inference_delay", 0)), max_delay)
        options["rtc_mode"] = mode
        options["leftover"] = np.asarray(leftover, np.float32)[None]  # (1, T_prev, A)
        return options


# ----------------------------------------------------------------------------------------------------------
# 3. The policy server
# ----------------------------------------------------------------------------------------------------------


class PolicyServer(socketserver.ThreadingTCPServer):
    """Serves the policies named on its own command line; a client can only pick one of them by name.

    Requests: {"type": "hello"} -> {"type": "hello", "policies": {name: info}};
              {"type": "observation", "id", "policy", "task"[, "rtc"]} + tensors
                  -> {"type": "actions", "id"} + {"actions": (n, action_dim) float32[, "normalized"]}.
    Anything wrong -> {"type": "error", "message"}.
    """

    allow_reuse_address = True
    daemon_threads = False  # so that server_close() waits for the connection threads (none dies inside torch)

    def __init__(self, address, runners, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, idle_timeout_s=300.0):
        if not runners:
            raise ValueError("a policy server needs at least one --policy")
        self.runners = runners
        self.max_message_bytes = max_message_bytes
        self.idle_timeout_s = idle_timeout_s
        self.connections = set()
        super().__init__(address, _PolicyConnection)

    def answer(self, header, tensors):
        """One request -> (reply header, reply tensors). Raises ValueError on a bad request."""
        if header["type"] == "hello":
            policies = {name: runner.info for name, runner in self.runners.items()}
            return {"type": "hello", "policies": policies}, None
        if header["type"] != "observation":
            raise ValueError(f"unknown request type {header['type']!r} (expected 'hello' or 'observation')")
        name = header.get("policy") or next(iter(self.runners))
        if name not in self.runners:
            raise ValueError(f"policy {name!r} is not served here; this server has {list(self.runners)}")
        observation = {"task": header.get("task", "")}
        if isinstance(header.get("rtc"), dict):
            observation["rtc"] = header["rtc"]
        observation.update(tensors)
        answer = self.runners[name](observation)
        return {"type": "actions", "id": header.get("id")}, answer

    def start(self):
        """Accept connections on a background thread; returns self."""
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="server")
        self.thread.start()
        return self

    def close_all(self):
        """Stop accepting, drop every open connection (clients see a disconnect and reconnect later) and wait
        for the connection threads to finish the request they are computing."""
        self.shutdown()
        for connection in list(self.connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the client
        self.server_close()
        self.thread.join()


class _PolicyConnection(socketserver.BaseRequestHandler):
    """One client connection: read a request, answer it, repeat until the client goes away."""

    def handle(self):
        server = self.server
        sock = self.request
        server.connections.add(sock)
        try:
            while True:
                try:
                    header, tensors = recv_message(sock, server.idle_timeout_s, server.max_message_bytes)
                except ProtocolError as e:
                    # the byte stream can no longer be trusted: say why, then drop the connection
                    print(f"[server] malformed message from {self.client_address}: {e}", file=sys.stderr)
                    self._reply({"type": "error", "message": f"malformed message: {e}"}, None)
                    return
                except (OSError, ConnectionError):
                    return  # client left or stayed silent past idle_timeout_s
                try:
                    reply_header, reply_tensors = server.answer(header, tensors)
                # a bad request or a failing policy is answered as an error; the server keeps serving
                except Exception as e:  # noqa: BLE001
                    print(f"[server] request failed: {type(e).__name__}: {e}", file=sys.stderr)
                    reply_header = {"type": "error", "id": header.get("id"),
                                    "message": f"{type(e).__name__}: {e}"}
                    reply_tensors = None
                if not self._reply(reply_header, reply_tensors):
                    return
        finally:
            server.connections.discard(sock)

    def _reply(self, header, tensors):
        try:
            send_message(self.request, header, tensors)
            return True
        except OSError:
            return False


def serve(args):
    """`infer_async.py --serve`: load every --policy and serve them until Ctrl-C."""
    names = args.policy or []
    if not names:
        raise ValueError("--serve needs at least one --policy")
    runners = {}
    for name in names:
        runners[name] = PolicyRunner(load_policy(name, args.vlm, args.device, args.dtype), args.seed)
    server = PolicyServer((args.host, args.port_server), runners, int(args.max_message_mb * 2**20))
    server.start()
    print(f"serving {list(runners)} on {args.host}:{args.port_server} (Ctrl-C stops)")
    try:
        while server.thread.is_alive():
            server.thread.join(0.5)
    except KeyboardInterrupt:
        print("server stopping")
    finally:
        server.close_all()


# ----------------------------------------------------------------------------------------------------------
# 4. The client, and the command line's choice: in-process or remote
# ----------------------------------------------------------------------------------------------------------


class PolicyClient:
    """Talks to a PolicyServer; callable like a PolicyRunner. Connects lazily, reconnects after any error."""

    def __init__(self, address, policy=None, timeout_s=10.0, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES):
        self.address = address
        self.policy = policy
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self.sock = None
        self._next_id = 0

    def hello(self):
        """The info of the chosen policy ({"chunk_size", "cameras", "trained_on"}), from the server."""
        header, _ = self._exchange({"type": "hello"}, None)
        policies = header.get("policies")
        if header["type"] != "hello" or not isinstance(policies, dict) or not policies:
            raise ProtocolError(f"server answered hello with {header!r:.200}")
        if not self.policy:
            self.policy = next(iter(policies))  # the server's first
        if self.policy not in policies:
            raise ValueError(f"server {self.address} does not serve {self.policy!r}; it has {list(policies)}")
        return policies[self.policy]

    def __call__(self, observation):
        self._next_id += 1
        request = {"type": "observation", "id": self._next_id, "policy": self.policy,
                   "task": observation.get("task", "")}
        if "rtc" in observation:
            request["rtc"] = observation["rtc"]
        # the state, the camera frames and RTC's leftover travel as tensors
        tensors = {}
        for name, value in observation.items():
            if isinstance(value, np.ndarray):
                tensors[name] = np.ascontiguousarray(value)
        header, reply = self._exchange(request, tensors)
        if header["type"] != "actions" or header.get("id") != self._next_id or "actions" not in reply:
            shapes = [(name, tensor.shape) for name, tensor in reply.items()]
            raise ProtocolError(f"unexpected answer to request {self._next_id}: {header!r:.200}, "
                                f"tensors {shapes}")
        # its shape and values are checked by the scheduler; "normalized" comes with an RTC request
        return reply

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _exchange(self, header, tensors):
        """Send one request, read one reply. On any failure drop the connection, so that the next call
        reconnects and a late reply to a timed-out request can never be taken for the answer to the next."""
        try:
            if self.sock is None:
                self.sock = socket.create_connection(self.address, timeout=self.timeout_s)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            send_message(self.sock, header, tensors, self.timeout_s)
            reply_header, reply_tensors = recv_message(self.sock, self.timeout_s, self.max_message_bytes)
        except (OSError, ProtocolError):
            self.close()
            raise
        if reply_header["type"] == "error":
            raise RemoteError(str(reply_header.get("message")))
        return reply_header, reply_tensors


def parse_address(text):
    """'HOST:PORT' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--server expects HOST:PORT (e.g. 127.0.0.1:8765), got {text!r}")
    return host, int(port)


def connect_to_server(client, wait_s=10.0):
    """hello() with retries for up to wait_s seconds, so the client may start before the server."""
    deadline = time.monotonic() + wait_s
    delay = 0.1
    while True:
        try:
            return client.hello()
        except (OSError, ProtocolError) as e:
            if time.monotonic() + delay > deadline:
                raise ConnectionError(f"no policy server answered at {client.address[0]}:{client.address[1]} "
                                      f"within {wait_s} s ({e}); start one with "
                                      f"`python infer_async.py --serve --policy ...`") from None
            time.sleep(delay)
            delay = min(2 * delay, 1.0)


def add_policy_arguments(parser):
    """The command-line flags that serve and open_policy read: which policy, where it runs, the wire's
    limits."""
    policy_group = parser.add_argument_group("the policy: in this process (default), on a --server, "
                                             "or --serve it")
    policy_group.add_argument("--policy", action="append",
                              help="checkpoint dir or hub id; with --serve repeatable; with --server the "
                                   "name of one of the server's policies (default: its first)")
    policy_group.add_argument("--vlm", help="VLM dir or hub id (default: <checkpoint>/vlm or the config's)")
    policy_group.add_argument("--device", default="cpu")
    policy_group.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    policy_group.add_argument("--server", help="HOST:PORT of a policy server (default: infer in-process)")
    policy_group.add_argument("--timeout", type=float, default=10.0, help="seconds per request to the server")
    policy_group.add_argument("--serve", action="store_true", help="run a policy server instead of an arm")
    policy_group.add_argument("--host", default="127.0.0.1", help="--serve: address to listen on")
    policy_group.add_argument("--port-server", type=int, default=8765, help="--serve: TCP port to listen on")
    policy_group.add_argument("--max-message-mb", type=float, default=64.0, help="largest message accepted")
    policy_group.add_argument("--seed", type=int,
                              help="seed of the sampling noise (with --server: give it to the server)")
    add_rtc_arguments(parser)


def add_rtc_arguments(parser):
    """The command-line flags of Real-Time Chunking that a request carries (infer_async.rtc_options)."""
    rtc_group = parser.add_argument_group("Real-Time Chunking (flow.py): each chunk continues the one "
                                          "being executed")
    rtc_group.add_argument("--rtc", choices=("off", "guided", "trained"), default="off",
                           help="guided: inpainting toward the leftover; "
                                "trained: a policy trained with --rtc-max-delay")
    # the defaults are the library's: smolvla.RTC_DEFAULTS, chosen from the README's RTC lab (imported here,
    # where a command line is built, like torch where a policy runs)
    from smolvla import RTC_DEFAULTS

    rtc_group.add_argument("--execution-horizon", type=int, default=RTC_DEFAULTS["execution_horizon"],
                           help="guided: the guidance ends this many steps in (%(default)s)")
    rtc_group.add_argument("--max-guidance-weight", type=float, default=RTC_DEFAULTS["max_guidance_weight"],
                           help="guided: β, the cap of the guidance weight (%(default)s)")
    rtc_group.add_argument("--rtc-schedule", default=RTC_DEFAULTS["schedule"],
                           help="guided: prefix weights zeros, ones, linear or exp (%(default)s)")
    rtc_group.add_argument("--rtc-jacobian", action=argparse.BooleanOptionalAction,
                           default=RTC_DEFAULTS["jacobian"],
                           help="guided: the paper's correction, a backward pass per step "
                                "(default: the reference's)")


def open_policy(args):
    """-> (callable observation -> {"actions", ...}, {"chunk_size", "cameras", "trained_on"}): in-process,
    or a policy server."""
    if args.server:
        if args.policy and len(args.policy) > 1:
            raise ValueError("with --server, --policy names one of the server's policies")
        # the server's policy named by --policy, or None: the server's first
        policy_name = None
        if args.policy:
            policy_name = args.policy[0]
        client = PolicyClient(parse_address(args.server), policy_name, args.timeout,
                              int(args.max_message_mb * 2**20))
        return client, connect_to_server(client)
    if not args.policy or len(args.policy) != 1:
        raise ValueError("give exactly one --policy (a checkpoint dir or hub id), or --server HOST:PORT")
    runner = PolicyRunner(load_policy(args.policy[0], args.vlm, args.device, args.dtype), args.seed)
    return runner, runner.info
