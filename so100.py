"""The arm: the Feetech serial-bus protocol by hand, the SO-100/SO-101 follower arm, its calibration, cameras.

SmolVLA (arXiv 2506.01844, §4) was trained on community data recorded on the SO-100: a ~$100 arm made of six
Feetech STS3215 servos chained on one half-duplex UART (a USB adapter such as /dev/ttyACM0 at 1,000,000 baud).
To run the policy on a real arm we must speak that bus ourselves. This file builds it up in four layers:

1. The wire format ("protocol 0"): instruction packets `FF FF id len inst params… checksum` going out, status
   packets `FF FF id len error data… checksum` coming back, with `checksum = ~(id + len + inst + Σparams)`.
2. The STS3215 control table: every setting of a servo is a register (address, size in bytes); a few are
   sign-magnitude numbers (the sign is one bit, the rest is the magnitude).
3. `FeetechBus`: PING / READ / WRITE / SYNC_READ / SYNC_WRITE over pyserial, made robust against what real
   buses do (lost replies, corrupted bytes, a servo that is unplugged): every reply is read by exact byte count
   with a deadline, searched for its `FF FF` header, checked (checksum, id, length), and retried; what still
   fails raises a `FeetechError` that names the servo and what went wrong.
4. `SO100Follower`: six named joints, calibration (homing offsets and ranges, stored in lerobot's JSON format),
   normalization of raw encoder ticks to the units the datasets were recorded in (degrees, or −100..100, and
   0..100 for the gripper), a per-step safety clamp, and torque switched off whatever happens.

`python so100.py --port /dev/ttyACM0 scan|calibrate|read|move …` is the lab entry point; `--port sim` runs everything
against `virtual_arm.VirtualArm`, a simulated bus on a pseudo-terminal.
"""

import argparse
import atexit
import json
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import serial

# ------------------------------------------------------------------------------------------------------------
# 1. The wire format
# ------------------------------------------------------------------------------------------------------------

HEADER = b"\xff\xff"
BROADCAST_ID = 0xFE  # every servo executes a packet sent to this id; none of them replies (except to PING)

PING = 0x01
READ = 0x02
WRITE = 0x03
SYNC_READ = 0x82  # read the same register from many servos: each answers with its own status packet
SYNC_WRITE = 0x83  # write the same register on many servos at once: nobody answers

# The error byte of a status packet: one bit per condition the servo reports.
ERROR_BITS = {
    0x01: "input voltage out of range",
    0x02: "angle sensor error",
    0x04: "overheat",
    0x08: "over-current",
    0x20: "overload",
}


def checksum(body):
    """The protocol's checksum of `id, len, inst/error, params…`: the bitwise NOT of their sum, low byte."""
    return ~sum(body) & 0xFF


def instruction_packet(servo_id, instruction, params=b""):
    """`FF FF id len inst params… chk`; len counts the instruction, the params and the checksum."""
    if not 0 <= servo_id <= BROADCAST_ID:
        raise ValueError(f"servo ids are 0..253 (254 = broadcast), got {servo_id}")
    body = bytes([servo_id, len(params) + 2, instruction]) + bytes(params)
    return HEADER + body + bytes([checksum(body)])


def status_packet(servo_id, error, data=b""):
    """What a servo sends back: `FF FF id len error data… chk` (the servo's side, used by the virtual arm)."""
    body = bytes([servo_id, len(data) + 2, error]) + bytes(data)
    return HEADER + body + bytes([checksum(body)])


def ping_packet(servo_id):
    return instruction_packet(servo_id, PING)


def read_packet(servo_id, address, size):
    return instruction_packet(servo_id, READ, [address, size])


def write_packet(servo_id, address, data):
    return instruction_packet(servo_id, WRITE, bytes([address]) + bytes(data))


def sync_read_packet(address, size, servo_ids):
    """Broadcast `address, size, id1, id2, …`; the servos answer one after the other, in the listed order."""
    return instruction_packet(BROADCAST_ID, SYNC_READ, bytes([address, size, *servo_ids]))


def sync_write_packet(address, size, data_by_id):
    """Broadcast `address, size, (id, data…)…`: one packet sets the register on every listed servo."""
    params = bytearray([address, size])
    for servo_id, data in data_by_id.items():
        if len(data) != size:
            raise ValueError(f"servo {servo_id}: {len(data)} data bytes for a {size}-byte register")
        params += bytes([servo_id]) + bytes(data)
    return instruction_packet(BROADCAST_ID, SYNC_WRITE, params)


@dataclass(frozen=True)
class Status:
    """A decoded status packet."""

    servo_id: int
    error: int  # the error byte (see ERROR_BITS)
    data: bytes  # the register bytes for a READ / SYNC_READ, empty otherwise


def parse_status(packet):
    """Decode one complete status packet, checking header, length field and checksum."""
    packet = bytes(packet)
    if len(packet) < 6 or packet[:2] != HEADER:
        raise ValueError(f"not a status packet: {packet.hex(' ')}")
    if packet[3] != len(packet) - 4:
        raise ValueError(f"length field {packet[3]} does not match a {len(packet)}-byte packet")
    if checksum(packet[2:-1]) != packet[-1]:
        raise ValueError(f"bad checksum in {packet.hex(' ')}")
    return Status(servo_id=packet[2], error=packet[4], data=packet[5:-1])


def describe_error_bits(error):
    """'overload, overheat' for an error byte; unknown bits are named by their value."""
    names = [name for bit, name in ERROR_BITS.items() if error & bit]
    names += [f"unknown error bit 0x{bit:02X}" for bit in (0x10, 0x40, 0x80) if error & bit]
    return ", ".join(names)


def servo_error_message(error):
    """What to tell the user about a status packet's error byte."""
    message = f"reports {describe_error_bits(error)}"
    if error & 0x20:
        message += " (the servo cut its torque: remove the load; if it persists, power-cycle the arm)"
    return message


# ------------------------------------------------------------------------------------------------------------
# 2. The STS3215 control table
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Register:
    name: str
    address: int
    size: int  # bytes, little-endian
    sign_bit: int | None = None  # sign-magnitude numbers: this bit is the sign, the lower bits the magnitude
    read_only: bool = False


CONTROL_TABLE = {
    r.name: r
    for r in [
        # EEPROM (addresses below 40): identity, limits, tuning; kept at power-off if written while Lock = 0
        Register("Firmware_Major_Version", 0, 1, read_only=True),
        Register("Firmware_Minor_Version", 1, 1, read_only=True),
        Register("Model_Number", 3, 2, read_only=True),
        Register("ID", 5, 1),
        Register("Baud_Rate", 6, 1),  # 0 = 1 Mbps
        Register("Return_Delay_Time", 7, 1),  # in units of 2 µs
        Register("Response_Status_Level", 8, 1),  # 0: answer only PING and READ
        Register("Min_Position_Limit", 9, 2),
        Register("Max_Position_Limit", 11, 2),
        Register("Max_Temperature_Limit", 13, 1),
        Register("Max_Voltage_Limit", 14, 1),
        Register("Min_Voltage_Limit", 15, 1),
        Register("Max_Torque_Limit", 16, 2),
        Register("Phase", 18, 1),  # bit 4 set = multi-turn positions (beyond 0..4095)
        Register("Unloading_Condition", 19, 1),
        Register("LED_Alarm_Condition", 20, 1),
        Register("P_Coefficient", 21, 1),
        Register("D_Coefficient", 22, 1),
        Register("I_Coefficient", 23, 1),
        Register("Minimum_Startup_Force", 24, 2),
        Register("CW_Dead_Zone", 26, 1),
        Register("CCW_Dead_Zone", 27, 1),
        Register("Protection_Current", 28, 2),
        Register("Angular_Resolution", 30, 1),
        Register("Homing_Offset", 31, 2, sign_bit=11),
        Register("Operating_Mode", 33, 1),  # 0 = position servo
        Register("Protective_Torque", 34, 1),
        Register("Protection_Time", 35, 1),
        Register("Overload_Torque", 36, 1),
        # SRAM: commands and live state (lost at power-off)
        Register("Torque_Enable", 40, 1),
        Register("Acceleration", 41, 1),
        Register("Goal_Position", 42, 2, sign_bit=15),
        Register("Goal_Time", 44, 2),
        Register("Goal_Velocity", 46, 2, sign_bit=15),
        Register("Torque_Limit", 48, 2),
        Register("Lock", 55, 1),  # 0 = EEPROM writes are saved, 1 = they are lost at power-off
        Register("Present_Position", 56, 2, sign_bit=15, read_only=True),
        Register("Present_Velocity", 58, 2, sign_bit=15, read_only=True),
        Register("Present_Load", 60, 2, sign_bit=10, read_only=True),
        Register("Present_Voltage", 62, 1, read_only=True),  # 0.1 V
        Register("Present_Temperature", 63, 1, read_only=True),  # °C
        Register("Moving", 66, 1, read_only=True),
        Register("Present_Current", 69, 2, read_only=True),
        Register("Maximum_Acceleration", 85, 1),
    ]
}

STS3215_MODEL_NUMBER = 777
RESOLUTION = 4096  # encoder ticks per turn
MAX_TICK = RESOLUTION - 1  # 4095, the "360°" of lerobot's degree formula


def register(name):
    """Look a register up by name, with a helpful error for typos."""
    try:
        return CONTROL_TABLE[name]
    except KeyError:
        raise KeyError(f"unknown STS3215 register {name!r}; known: {', '.join(CONTROL_TABLE)}") from None


def writable_register(name):
    """`register(name)` for a WRITE / SYNC_WRITE: the read-only ones (model number, live state) are refused."""
    reg = register(name)
    if reg.read_only:
        raise ValueError(f"{name} is read-only")
    return reg


def encode_sign_magnitude(value, sign_bit):
    """-5 with sign bit 11 -> 0x805: the sign in one bit, |value| in the bits below it."""
    magnitude = abs(int(value))
    if magnitude >= 1 << sign_bit:
        raise ValueError(f"{value} does not fit in {sign_bit} magnitude bits (max ±{(1 << sign_bit) - 1})")
    return ((1 << sign_bit) if value < 0 else 0) | magnitude


def decode_sign_magnitude(raw, sign_bit):
    magnitude = raw & ((1 << sign_bit) - 1)
    return -magnitude if raw >> sign_bit & 1 else magnitude


def encode_value(reg, value):
    """A register value (signed where the register is) -> its little-endian bytes."""
    raw = encode_sign_magnitude(value, reg.sign_bit) if reg.sign_bit is not None else int(value)
    if not 0 <= raw < 1 << (8 * reg.size):
        raise ValueError(f"{reg.name}: {value} does not fit in {reg.size} byte(s)")
    return raw.to_bytes(reg.size, "little")


def decode_value(reg, data):
    raw = int.from_bytes(data, "little")
    return decode_sign_magnitude(raw, reg.sign_bit) if reg.sign_bit is not None else raw


# ------------------------------------------------------------------------------------------------------------
# 3. The bus
# ------------------------------------------------------------------------------------------------------------


class FeetechError(RuntimeError):
    """A servo did not answer, answered garbage, or reported an error, even after retries.

    `servo_id` is the (first) servo at fault, `failures` maps every failing id to what went wrong, and `partial`
    holds the values that a SYNC_READ did get right from the other servos.
    """

    def __init__(self, message, servo_id=None, failures=None, partial=None):
        super().__init__(message)
        self.servo_id = servo_id
        self.failures = failures or {}
        self.partial = partial or {}


class FeetechBus:
    """One serial port with Feetech servos on it (protocol 0, the STS/SMS series).

    Every transaction clears stale input, sends one packet, then reads status packets by exact byte counts until
    a deadline (`timeout` plus the time the expected bytes take on the wire). Failed transactions are retried
    `retries` times; a servo that reports error bits is not retried (that is its state, not a transmission
    fault). `names` ({id: "elbow_flex"}) only makes error messages friendlier.
    """

    def __init__(self, port, baudrate=1_000_000, timeout=0.05, retries=3, names=None):
        self.port = port
        self.baudrate = baudrate
        self.timeout = timeout
        self.retries = retries
        self.names = dict(names or {})
        try:
            self._serial = serial.Serial(port, baudrate=baudrate, timeout=timeout, write_timeout=1.0)
        except serial.SerialException as e:
            raise FileNotFoundError(
                f"cannot open serial port {port!r} ({e}); check the USB cable, the port name "
                "(ls /dev/ttyACM* /dev/ttyUSB*) and that you may use it (group dialout)"
            ) from e
        # FTDI adapters buffer replies for 16 ms unless asked for low latency; other drivers don't support it.
        try:
            self._serial.set_low_latency_mode(True)
        except (OSError, ValueError, AttributeError):
            pass
        self._rx = bytearray()  # bytes received but not yet consumed, for the current transaction
        self._echo = None  # the instruction just sent, in case the adapter echoes it back

    # -- public operations (the contract) --------------------------------------------------------------------

    def ping(self, servo_id):
        """PING a servo, then READ its model number (777 for the STS3215)."""
        self._transact(servo_id, ping_packet(servo_id), 0, "PING")
        return self.read(servo_id, "Model_Number")

    def broadcast_ping(self):
        """PING every servo at once; returns the sorted ids that answered."""
        self._send(ping_packet(BROADCAST_ID))
        found = set()
        deadline = time.monotonic() + self.timeout + self._wire_time(6 * 253)
        # Servos answer one after the other; keep collecting until the line stays quiet for one timeout.
        while True:
            status, problem = self._next_status(deadline, max_data=0)
            if status is None and problem is None:
                return sorted(found)
            if status is not None:
                found.add(status.servo_id)
            deadline = time.monotonic() + self.timeout

    def read(self, servo_id, name):
        """READ one register; returns its value decoded (signed where the register is signed)."""
        reg = register(name)
        data = self._transact(servo_id, read_packet(servo_id, reg.address, reg.size), reg.size, f"READ {name}")
        return decode_value(reg, data)

    def write(self, servo_id, name, value):
        """WRITE one register and wait for the servo's acknowledgement (a status packet without data)."""
        reg = writable_register(name)
        packet = write_packet(servo_id, reg.address, encode_value(reg, value))
        self._transact(servo_id, packet, 0, f"WRITE {name}={value}")

    def sync_read(self, name, servo_ids):
        """SYNC_READ one register from several servos: {id: value}.

        Each servo answers with its own status packet; they are parsed one by one and assigned by the id they
        carry, so a servo that stays silent cannot shift the others' values. Missing ones are asked again.
        """
        reg = register(name)
        servo_ids = list(servo_ids)
        values, failures = {}, {}
        pending = servo_ids
        for _ in range(1 + self.retries):
            packet = sync_read_packet(reg.address, reg.size, pending)
            statuses, problems = self._exchange(packet, {i: reg.size for i in pending})
            for servo_id, status in statuses.items():
                if status.error:
                    failures[servo_id] = servo_error_message(status.error)
                values[servo_id] = decode_value(reg, status.data)
            pending = [i for i in pending if i not in statuses]
            if not pending:
                break
        for servo_id in pending:
            failures[servo_id] = f"{problems[servo_id]} after {1 + self.retries} tries"
        if failures:
            good = {i: values[i] for i in servo_ids if i in values and i not in failures}
            raise self._error(f"SYNC_READ {name}", failures, partial=good)
        return {i: values[i] for i in servo_ids}

    def sync_write(self, name, values_by_id):
        """SYNC_WRITE one register on several servos ({id: value}); the servos send no reply."""
        reg = writable_register(name)
        data = {servo_id: encode_value(reg, value) for servo_id, value in values_by_id.items()}
        self._send(sync_write_packet(reg.address, reg.size, data))

    def close(self):
        self._serial.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- transactions -------------------------------------------------------------------------------------------

    def _transact(self, servo_id, packet, reply_size, what):
        """Send one instruction packet to one servo and return the data of its status packet, retrying faults."""
        if servo_id == BROADCAST_ID:
            raise ValueError("the broadcast id gets no reply: use sync_read / sync_write / broadcast_ping")
        for _ in range(1 + self.retries):
            statuses, problems = self._exchange(packet, {servo_id: reply_size})
            if servo_id in statuses:
                break
        else:
            raise self._error(what, {servo_id: f"{problems[servo_id]} after {1 + self.retries} tries"})
        status = statuses[servo_id]
        if status.error:
            raise self._error(what, {servo_id: servo_error_message(status.error)})
        return status.data

    def _exchange(self, packet, expected):
        """Send `packet`, then collect one status packet per id in `expected` ({id: data size}).

        Returns the statuses received ({id: Status}) and, for each id still missing, why ("no reply" or what
        was wrong with what came instead).
        """
        self._send(packet)
        reply_bytes = sum(6 + size for size in expected.values())
        deadline = time.monotonic() + self.timeout + self._wire_time(len(packet) + reply_bytes)
        statuses, problems = {}, dict.fromkeys(expected, "no reply")
        while len(statuses) < len(expected):
            status, problem = self._next_status(deadline, max_data=max(expected.values()))
            if problem is not None:
                # A damaged packet: blame the servo its id byte names, if it is one we wait for.
                culprit, reason = problem
                if culprit in problems and culprit not in statuses:
                    problems[culprit] = reason
                elif len(expected) == 1:
                    problems[next(iter(expected))] = reason
                continue
            if status is None:
                break  # deadline
            # A valid packet that is not the one we wait for (a late answer to an earlier request): skip it.
            if status.servo_id not in expected or status.servo_id in statuses:
                continue
            if len(status.data) != expected[status.servo_id]:
                problems[status.servo_id] = f"reply with {len(status.data)} data bytes instead of " \
                                            f"{expected[status.servo_id]}"
                continue
            statuses[status.servo_id] = status
        return statuses, problems

    def _next_status(self, deadline, max_data):
        """Read the next well-formed status packet (at most `max_data` data bytes) before `deadline`.

        Returns (Status, None), or (None, (id, reason)) for a damaged packet that was skipped, or (None, None)
        when the deadline passed. Garbage before a header is dropped: we resynchronize on the next `FF FF`.
        """
        while True:
            # Find the header; without one, drop everything but a trailing FF (maybe the first half of one).
            start = self._rx.find(HEADER)
            if start < 0:
                del self._rx[: -1 if self._rx.endswith(b"\xff") else len(self._rx)]
                if not self._fill(2, deadline):
                    return None, None
                continue
            del self._rx[:start]
            # FF FF FF …: the id can't be FF, so the real header starts one byte later.
            if not self._fill(4, deadline):
                return None, None
            if self._rx[2] == 0xFF:
                del self._rx[0]
                continue
            servo_id, length = self._rx[2], self._rx[3]
            if not 2 <= length <= max_data + 2:
                # Not a length we can be waiting for: a false header inside garbage, or a damaged one.
                del self._rx[:2]
                return None, (servo_id, f"corrupt reply (length field {length})")
            if not self._fill(4 + length, deadline):
                return None, None
            packet = bytes(self._rx[: 4 + length])
            if checksum(packet[2:-1]) != packet[-1]:
                # Drop only the header: a real packet may begin inside what we took for this one.
                del self._rx[:2]
                return None, (servo_id, "corrupt reply (bad checksum)")
            del self._rx[: 4 + length]
            if packet == self._echo:
                # Some half-duplex adapters hear their own transmission: that is not a servo's answer.
                self._echo = None
                continue
            return parse_status(packet), None

    def _fill(self, n, deadline):
        """Read until `n` bytes are buffered or the deadline passes; replies may arrive in any number of pieces."""
        while len(self._rx) < n:
            if time.monotonic() >= deadline:
                return False
            self._rx += self._serial.read(max(n - len(self._rx), self._serial.in_waiting))
        return True

    def _send(self, packet):
        """Start a transaction: clear stale input, then send `packet` (remembered, to spot an adapter's echo)."""
        # A late reply to an earlier, timed-out request must not be mistaken for the answer to this one.
        self._serial.reset_input_buffer()
        self._rx.clear()
        self._serial.write(packet)
        self._echo = packet

    def _wire_time(self, n_bytes):
        return n_bytes * 10 / self.baudrate  # 8 data bits + start + stop bit per byte

    def _error(self, what, failures, partial=None):
        parts = [f"servo {i}{self._name(i)}: {reason}" for i, reason in failures.items()]
        message = f"{what} on {self.port}: " + "; ".join(parts)
        return FeetechError(message, servo_id=next(iter(failures)), failures=failures, partial=partial)

    def _name(self, servo_id):
        return f" ({self.names[servo_id]})" if servo_id in self.names else ""


# ------------------------------------------------------------------------------------------------------------
# 4. The SO-100 / SO-101 follower arm
# ------------------------------------------------------------------------------------------------------------

MOTOR_NAMES = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]
MOTOR_IDS = {name: i + 1 for i, name in enumerate(MOTOR_NAMES)}  # shoulder_pan 1 … gripper 6
STATE_NAMES = [f"{name}.pos" for name in MOTOR_NAMES]  # the dataset order of state and action vectors
FULL_TURN_MOTOR = "wrist_roll"  # turns freely: its range is the whole encoder, not recorded

# Units of the joints (the gripper is always 0..100 = closed..open in the recorded range).
NORM_MODES = ("degrees", "range_m100_100")
# Calibration files live where lerobot keeps them, so a calibration made with lerobot loads as it is.
CALIBRATION_DIR = Path(
    os.getenv("HF_LEROBOT_CALIBRATION", Path(os.getenv("HF_LEROBOT_HOME", "~/.cache/huggingface/lerobot"))
              / "calibration")
).expanduser() / "robots" / "so_follower"
# Where a calibration lives in each servo's EEPROM: register -> the lerobot JSON field it holds (in write order).
CALIBRATION_REGISTERS = {"Homing_Offset": "homing_offset", "Min_Position_Limit": "range_min",
                         "Max_Position_Limit": "range_max"}


def load_calibration(path_or_dict):
    """Read and check a calibration in lerobot's JSON format:
    `{"shoulder_pan": {"id": 1, "drive_mode": 0, "homing_offset": -710, "range_min": 758, "range_max": 3292},
    …}` (all six motors).
    """
    source = path_or_dict
    if isinstance(path_or_dict, (str, Path)):
        path = Path(path_or_dict).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no calibration file at {path}: run `python so100.py --port PORT calibrate`")
        source = json.loads(path.read_text())
    if not isinstance(source, dict):
        raise ValueError(f"a calibration is a dict of motors, got {type(source).__name__}")
    calibration = {}
    for name in MOTOR_NAMES:
        entry = source.get(name)
        if not isinstance(entry, dict):
            raise ValueError(f"calibration has no entry for {name!r} (it has {list(source)}); expected lerobot's "
                             "format {motor: {id, drive_mode, homing_offset, range_min, range_max}}")
        try:
            entry = {k: int(entry[k]) for k in ("id", "drive_mode", "homing_offset", "range_min", "range_max")}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"calibration of {name!r} is incomplete or not integer: {e}") from None
        if entry["id"] != MOTOR_IDS[name]:
            raise ValueError(f"calibration says {name} has id {entry['id']}, the SO-100 uses {MOTOR_IDS[name]}")
        if entry["drive_mode"] != 0:
            raise ValueError(f"{name}: drive_mode {entry['drive_mode']} (inverted) is not used by the SO-100")
        if not 0 <= entry["range_min"] <= entry["range_max"] <= MAX_TICK:
            raise ValueError(f"{name}: range {entry['range_min']}..{entry['range_max']} is outside 0..{MAX_TICK}")
        if entry["range_min"] == entry["range_max"]:
            raise ValueError(f"{name}: empty range {entry['range_min']}..{entry['range_max']} (was the joint "
                             "moved through its range during calibration?)")
        calibration[name] = entry
    return calibration


def save_calibration(calibration, path):
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(calibration, indent=4) + "\n")


def _limits(calibration):
    lo = np.array([calibration[n]["range_min"] for n in MOTOR_NAMES], dtype=np.float64)
    hi = np.array([calibration[n]["range_max"] for n in MOTOR_NAMES], dtype=np.float64)
    return lo, hi


def normalize(raw, calibration, norm_mode="degrees"):
    """Raw Present_Position ticks (6,) -> the dataset's units, with lerobot's formulas.

    degrees:        (v − mid)·360/4095, mid = (min+max)/2           (not clamped)
    range_m100_100: (clamp(v) − min)/(max − min)·200 − 100
    gripper:        (clamp(v) − min)/(max − min)·100                  (always; 0 = range_min)
    """
    _check_norm_mode(norm_mode)
    raw = np.asarray(raw, dtype=np.float64)
    lo, hi = _limits(calibration)
    fraction = (np.clip(raw, lo, hi) - lo) / (hi - lo)  # 0..1 inside the recorded range
    if norm_mode == "degrees":
        out = (raw - (lo + hi) / 2) * 360 / MAX_TICK
    else:
        out = fraction * 200 - 100
    out[-1] = fraction[-1] * 100
    return out.astype(np.float32)


def unnormalize(values, calibration, norm_mode="degrees"):
    """The inverse of `normalize`, to Goal_Position ticks (truncated to int, as lerobot does)."""
    _check_norm_mode(norm_mode)
    values = np.asarray(values, dtype=np.float64)
    lo, hi = _limits(calibration)
    if norm_mode == "degrees":
        ticks = values * MAX_TICK / 360 + (lo + hi) / 2
    else:
        ticks = (np.clip(values, -100, 100) + 100) / 200 * (hi - lo) + lo
    ticks[-1] = np.clip(values[-1], 0, 100) / 100 * (hi[-1] - lo[-1]) + lo[-1]
    return [int(t) for t in ticks]  # int() truncates toward zero


def _check_norm_mode(norm_mode):
    if norm_mode not in NORM_MODES:
        raise ValueError(f"norm_mode must be one of {NORM_MODES}, got {norm_mode!r}")


def _enter_pressed(seconds):
    """Wait up to `seconds` for the user to press ENTER (without blocking longer)."""
    ready, _, _ = select.select([sys.stdin], [], [], seconds)
    if ready:
        sys.stdin.readline()
    return bool(ready)


class SO100Follower:
    """The SO-100/SO-101 follower arm: six STS3215 servos, ids 1..6, in the dataset order.

    `calibration` is a path or dict in lerobot's format (None: only `calibrate()` is possible). States and
    actions are (6,) arrays in `norm_mode` units for the five joints and 0..100 for the gripper.
    `max_relative_target` (a number, 6 numbers, or {motor: number}) caps how far one action may move a joint
    from where it is, in the same units. Torque goes off on `disconnect()`, when leaving a `with` block for any
    reason (an exception, Ctrl-C), and at interpreter exit.
    """

    def __init__(self, port, calibration=None, norm_mode="degrees", max_relative_target=None,
                 timeout=0.05, retries=3, verbose=True):
        _check_norm_mode(norm_mode)
        self.port = port
        self.calibration = load_calibration(calibration) if calibration is not None else None
        self.norm_mode = norm_mode
        self.max_relative_target = max_relative_target
        self.timeout, self.retries = timeout, retries
        self.verbose = verbose
        self.bus = None
        self.ids = [MOTOR_IDS[n] for n in MOTOR_NAMES]

    # -- connection ------------------------------------------------------------------------------------------

    def connect(self):
        """Open the bus, check the six servos, configure them, apply the calibration and hold the pose."""
        if self.bus is not None:
            return self
        self.bus = FeetechBus(self.port, timeout=self.timeout, retries=self.retries,
                              names={i: n for n, i in MOTOR_IDS.items()})
        atexit.register(self.disconnect)
        try:
            self._check_models()
            self._disable_torque()
            self._configure()
            if self.calibration is None:
                self._say(f"{self}: connected, torque off, NOT calibrated: call calibrate() "
                          f"(or run `python so100.py --port {self.port} calibrate`)")
                return self
            self._apply_calibration()
            self._enable_torque()
            self._say(f"{self}: connected; state in {self.units()}:\n{self.describe(self.get_state())}")
        except BaseException:
            self.disconnect()
            raise
        return self

    def disconnect(self):
        """Torque off (each servo tried even if others fail), then close the port."""
        if self.bus is None:
            return
        atexit.unregister(self.disconnect)
        try:
            self._disable_torque(best_effort=True)
        finally:
            self.bus.close()
            self.bus = None

    def __enter__(self):
        return self.connect()

    def __exit__(self, *exc):
        self.disconnect()

    def __str__(self):
        return f"SO100Follower({self.port})"

    # -- state and actions ------------------------------------------------------------------------------------

    def get_state(self):
        """Present joint positions, (6,) float32 in the dataset order and units."""
        return normalize(self.read_raw(), self._calibrated(), self.norm_mode)

    def read_raw(self):
        """Present_Position of the six servos in encoder ticks, (6,) int."""
        self._connected()
        positions = self.bus.sync_read("Present_Position", self.ids)
        return np.array([positions[i] for i in self.ids])

    def send_action(self, action):
        """Command the six goal positions; returns the action actually sent (after the safety clamp)."""
        calibration = self._calibrated()
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (len(MOTOR_NAMES),) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be 6 finite numbers ({', '.join(STATE_NAMES)}), got {action!r}")
        if self.max_relative_target is not None:
            # Cap each joint's step from where it is now, so one bad prediction can't slam the arm.
            present = self.get_state().astype(np.float64)
            cap = self.max_relative_target
            if isinstance(cap, dict):  # lerobot's per-motor form: {"shoulder_pan": 5.0, …}
                cap = [cap[name] for name in MOTOR_NAMES]
            cap = np.broadcast_to(np.asarray(cap, dtype=np.float64), action.shape)
            action = present + np.clip(action - present, -cap, cap)
        goal = np.clip(unnormalize(action, calibration, self.norm_mode), *_limits(calibration)).astype(int)
        self.bus.sync_write("Goal_Position", dict(zip(self.ids, goal.tolist())))
        return action.astype(np.float32)

    def units(self):
        joints = "degrees" if self.norm_mode == "degrees" else "-100..100 of the calibrated range"
        return f"{joints} for the joints, 0..100 for the gripper"

    @staticmethod
    def describe(state):
        return "  ".join(f"{name}={value:+.1f}" for name, value in zip(STATE_NAMES, state))

    # -- calibration ------------------------------------------------------------------------------------------

    def calibrate(self, prompt=input, wait=None, save_to=None):
        """Calibrate interactively, as lerobot does, and write the result to the servos' EEPROM.

        1. With torque off, the user puts the arm in the middle of its range and confirms (`prompt(message)`):
           each Homing_Offset is set so that this pose reads 2047 (Present = actual − Homing_Offset).
        2. The user moves every joint (but wrist_roll, which turns fully) through its whole range while the
           positions are recorded; `wait()` is called between reads and returns True once the user is done
           (by default: ENTER pressed). The extremes become range_min/range_max.
        `prompt` and `wait` are injectable so a test (or the virtual arm) can drive the joints.
        Returns the calibration dict (lerobot format), also saved to `save_to` if given.
        """
        self._connected()
        show = wait is None
        wait = wait or (lambda: _enter_pressed(0.05))
        self._disable_torque()  # connect() already put every servo in position mode

        prompt(f"Move {self} to the middle of its range of motion and press ENTER...")
        # Forget the old calibration so Present_Position reads the raw encoder, then centre each joint on 2047.
        self._write_eeprom({"Homing_Offset": [0] * 6, "Min_Position_Limit": [0] * 6,
                            "Max_Position_Limit": [MAX_TICK] * 6})
        middle = self.read_raw()
        offsets = (middle - MAX_TICK // 2).tolist()  # 2047 = half a turn
        self._write_eeprom({"Homing_Offset": offsets})

        self._say(f"Move all joints except {FULL_TURN_MOTOR} through their entire ranges of motion; "
                  "press ENTER when done.")
        lo = hi = self.read_raw()
        while True:
            positions = self.read_raw()
            lo, hi = np.minimum(lo, positions), np.maximum(hi, positions)
            if show:
                print("  ".join(f"{n}:{a}<{p}<{b}" for n, a, p, b in zip(MOTOR_NAMES, lo, positions, hi)),
                      end="\r", flush=True)
            if wait():
                break
        if show:
            print()
        roll = MOTOR_NAMES.index(FULL_TURN_MOTOR)
        lo[roll], hi[roll] = 0, MAX_TICK
        calibration = {
            name: {"id": MOTOR_IDS[name], "drive_mode": 0, "homing_offset": int(offsets[k]),
                   "range_min": int(lo[k]), "range_max": int(hi[k])}
            for k, name in enumerate(MOTOR_NAMES)
        }
        self.calibration = load_calibration(calibration)  # rejects a joint that was never moved (min = max)
        self._apply_calibration(force=True)
        if save_to is not None:
            save_calibration(self.calibration, save_to)
            self._say(f"calibration saved to {save_to}")
        self._enable_torque()
        return self.calibration

    # -- servo configuration (what lerobot does on connect) -------------------------------------------------

    def _check_models(self):
        for name, servo_id in MOTOR_IDS.items():
            model = self.bus.ping(servo_id)
            if model != STS3215_MODEL_NUMBER:
                raise FeetechError(f"{name} (id {servo_id}) on {self.port} is model {model}, expected an "
                                   f"STS3215 ({STS3215_MODEL_NUMBER})", servo_id=servo_id)

    def _configure(self):
        """Position mode, fast acceleration, lerobot's PID gains, a gentler gripper (torque must be off)."""
        self._write_eeprom({
            "Return_Delay_Time": [0] * 6,  # answer after 2 µs instead of the factory 500 µs
            "Operating_Mode": [0] * 6,  # position servo
            "P_Coefficient": [16] * 6,  # lerobot's gains: softer than the factory P=32 (less shaking)
            "I_Coefficient": [0] * 6,
            "D_Coefficient": [32] * 6,
        })
        for servo_id in self.ids:
            # Phase bit 4 = multi-turn readings; clear it so positions stay within 0..4095.
            phase = self.bus.read(servo_id, "Phase")
            if phase & 0x10:
                self._write_eeprom({"Phase": {servo_id: phase & ~0x10}})
        gripper = MOTOR_IDS["gripper"]
        self._write_eeprom({"Max_Torque_Limit": {gripper: 500}, "Protection_Current": {gripper: 250},
                            "Overload_Torque": {gripper: 25}})  # half torque/current: the gripper stalls a lot
        self._write_all("Maximum_Acceleration", 254)
        self._write_all("Acceleration", 254)

    def _apply_calibration(self, force=False):
        """Write the calibration to the servos unless they already hold it."""
        calibration = self._calibrated()
        wanted = {reg: [calibration[n][key] for n in MOTOR_NAMES] for reg, key in CALIBRATION_REGISTERS.items()}
        if not force:
            present = {reg: [self.bus.read(i, reg) for i in self.ids] for reg in CALIBRATION_REGISTERS}
            if present == wanted:
                return
            self._say(f"{self}: the servos hold another calibration than the file; writing the file's")
        self._write_eeprom(wanted)

    def _write_eeprom(self, values):
        """The Lock dance: EEPROM registers are saved only while Lock = 0 and torque is off; Lock = 1 after.

        `values` maps register -> a list of 6 values (one per motor) or {id: value}.
        """
        self.bus.sync_write("Torque_Enable", dict.fromkeys(self.ids, 0))
        self._write_all("Lock", 0)
        for name, per_motor in values.items():
            items = per_motor.items() if isinstance(per_motor, dict) else zip(self.ids, per_motor)
            for servo_id, value in items:
                self.bus.write(servo_id, name, value)
        self._write_all("Lock", 1)

    def _enable_torque(self):
        # Hold the current pose: make the goal the present position before the motors engage.
        present = self.bus.sync_read("Present_Position", self.ids)
        self.bus.sync_write("Goal_Position", present)
        self._write_all("Torque_Enable", 1)
        self._write_all("Lock", 1)

    def _disable_torque(self, best_effort=False):
        failures = []
        for servo_id in self.ids:
            try:
                self.bus.write(servo_id, "Torque_Enable", 0)
                self.bus.write(servo_id, "Lock", 0)
            except (FeetechError, serial.SerialException, OSError) as e:
                if not best_effort:
                    raise
                failures.append(str(e))
        if failures:
            print(f"WARNING {self}: could not switch torque off: " + "; ".join(failures), file=sys.stderr)

    def _write_all(self, name, value):
        for servo_id in self.ids:
            self.bus.write(servo_id, name, value)

    def _connected(self):
        if self.bus is None:
            raise RuntimeError(f"{self} is not connected: call connect() first (or use `with arm:`)")

    def _calibrated(self):
        self._connected()
        if self.calibration is None:
            raise RuntimeError(f"{self} has no calibration: pass calibration=PATH or call calibrate()")
        return self.calibration

    def _say(self, message):
        if self.verbose:
            print(message)


# ------------------------------------------------------------------------------------------------------------
# Cameras, and opening a real or virtual arm
# ------------------------------------------------------------------------------------------------------------


class OpenCVCamera:
    """A USB camera (device index) or a video file, read as (H, W, 3) uint8 RGB frames."""

    def __init__(self, index_or_path, width=640, height=480, fps=None):
        import cv2

        self._cv2 = cv2
        self.source = index_or_path
        self._capture = cv2.VideoCapture(index_or_path)
        if not self._capture.isOpened():
            raise FileNotFoundError(f"cannot open camera {index_or_path!r}: check `ls /dev/video*` or the path")
        self._capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        self._capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        if fps is not None:
            self._capture.set(cv2.CAP_PROP_FPS, fps)
        self.width, self.height = width, height
        frame = self.read()
        if frame.shape[:2] != (height, width):
            self.close()
            raise ValueError(f"camera {index_or_path!r} delivers {frame.shape[1]}x{frame.shape[0]} frames, not "
                             f"{width}x{height}: pass width={frame.shape[1]}, height={frame.shape[0]}")

    def read(self):
        ok, bgr = self._capture.read()
        if not ok:
            raise RuntimeError(f"camera {self.source!r} returned no frame (unplugged, or end of the video)")
        return self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB)  # OpenCV delivers BGR; datasets are RGB

    def close(self):
        self._capture.release()


def default_calibration(calibration, arm_id, virtual=None):
    """`calibration` if given, else the virtual arm's own (its servos come calibrated), else the file
    `<CALIBRATION_DIR>/<arm_id>.json` that `calibrate` writes for a real arm."""
    if calibration is not None:
        return calibration
    return virtual.calibration if virtual is not None else CALIBRATION_DIR / f"{arm_id}.json"


def open_arm(port, calibration=None, norm_mode="degrees", max_relative_target=None, arm_id="my_so100",
             verbose=True, **sim_options):
    """Connect to a real arm ("/dev/ttyACM0") or a fresh virtual one ("sim").

    Returns (connected SO100Follower, VirtualArm or None). A real arm's calibration defaults to the file
    `<CALIBRATION_DIR>/<arm_id>.json`; the virtual arm comes calibrated. `sim_options` go to VirtualArm. Close
    the virtual arm with `.close()` after disconnecting the arm.
    """
    virtual = None
    if port == "sim":
        from virtual_arm import VirtualArm

        virtual = VirtualArm(**sim_options)
        port = virtual.port
    elif sim_options:
        raise ValueError(f"options {sorted(sim_options)} only apply to --port sim")
    calibration = default_calibration(calibration, arm_id, virtual)
    try:
        arm = SO100Follower(port, calibration, norm_mode=norm_mode, max_relative_target=max_relative_target,
                            verbose=verbose)
        arm.connect()
    except BaseException:
        if virtual is not None:
            virtual.close()
        raise
    return arm, virtual


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description="SO-100/SO-101 follower arm over the Feetech bus.")
    parser.add_argument("--port", required=True, help="serial port (/dev/ttyACM0) or 'sim' for the virtual arm")
    parser.add_argument("--id", default="my_so100", help="arm name: the calibration file is <id>.json")
    parser.add_argument("--calibration", help=f"calibration JSON (default: {CALIBRATION_DIR}/<id>.json)")
    parser.add_argument("--norm-mode", default="degrees", choices=NORM_MODES,
                        help="joint units; must match the units the policy's dataset was recorded in")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("calibrate", help="record homing offsets and ranges, write them to the servos and the file")
    read = sub.add_parser("read", help="print the joint state")
    read.add_argument("--seconds", type=float, default=0, help="keep printing for this long (0: once)")
    read.add_argument("--hz", type=float, default=10)
    move = sub.add_parser("move", help="move to a target (6 values, dataset order and units)")
    move.add_argument("target", type=float, nargs=6, metavar="VALUE")
    move.add_argument("--max-step", type=float, default=5.0, help="largest change per step (units of the mode)")
    move.add_argument("--hz", type=float, default=30)
    move.add_argument("--seconds", type=float, default=10, help="give up after this long")
    sub.add_parser("scan", help="list the servos that answer a broadcast PING, with their model numbers")
    args = parser.parse_args(argv)

    virtual = None
    if args.port == "sim":
        from virtual_arm import VirtualArm

        virtual = VirtualArm()
    try:
        port = virtual.port if virtual is not None else args.port
        if args.command == "scan":
            scan(port)
            return
        # calibrate makes the calibration (and saves it where read and move will look for it)
        calibrating = args.command == "calibrate"
        calibration = None if calibrating else default_calibration(args.calibration, args.id, virtual)
        with SO100Follower(port, calibration, norm_mode=args.norm_mode) as arm:
            if calibrating:
                # On the virtual arm a scripted "hand" moves the joints; on a real one, you do.
                prompt, wait = virtual.calibration_hand() if virtual is not None else (input, None)
                arm.calibrate(prompt=prompt, wait=wait, save_to=default_calibration(args.calibration, args.id))
                print(json.dumps(arm.calibration, indent=4))
            elif args.command == "read":
                print_state(arm, args.seconds, args.hz)
            elif args.command == "move":
                move_to(arm, np.array(args.target), args.max_step, args.hz, args.seconds)
    except KeyboardInterrupt:
        print("\ninterrupted: torque off")
    finally:
        if virtual is not None:
            virtual.close()


def scan(port):
    """Whatever answers on the bus at 1 Mbps: id and model number."""
    with FeetechBus(port) as bus:
        for servo_id in bus.broadcast_ping():
            print(f"id {servo_id}: model {bus.read(servo_id, 'Model_Number')}")


def print_state(arm, seconds, hz):
    end = time.monotonic() + seconds
    while True:
        print(arm.describe(arm.get_state()), flush=True)
        if time.monotonic() >= end:
            return
        time.sleep(1 / hz)


def move_to(arm, target, max_step, hz, seconds):
    """Step toward `target`, each step capped to `max_step` from where the arm is, until the arm has not
    moved for half a second (arrived, or held by a joint limit or a load) or `seconds` passed."""
    arm.max_relative_target = max_step
    now = time.monotonic()
    end, moved_at, previous = now + seconds, now, arm.get_state()
    while now < end and now - moved_at < 0.5:
        arm.send_action(target)
        time.sleep(1 / hz)
        state, now = arm.get_state(), time.monotonic()
        if np.abs(state - previous).max() > 0.05:
            moved_at = now
        previous = state
    print(arm.describe(arm.get_state()))


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    # `kill` (SIGTERM) unwinds like Ctrl-C: the `with` block switches the torque off either way.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        main()
    except (FeetechError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")  # the message says what is wrong and what to do; the torque is already off
