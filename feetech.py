"""Talking to Feetech servos by hand: the wire format, the STS3215 control table, and a bus that survives
faults.

SmolVLA (arXiv 2506.01844, §4) was trained on community data recorded on SO-100 arms: ~$100 arms made of six
Feetech STS3215 servos chained on one half-duplex UART (a USB adapter such as /dev/ttyACM0 at 1,000,000 baud).
Half-duplex means one wire for both directions: the computer sends a packet, then listens, and the servos
answer one at a time. To run the policy on a real arm we must speak that bus ourselves. This file builds it
up in layers (the arm on top of it, with joint names, calibration and units, is so100.py):

1. The wire format ("protocol 0"): instruction packets `FF FF id len inst params… checksum` going out,
   status packets `FF FF id len error data… checksum` coming back, with
   `checksum = ~(id + len + inst + Σparams)`.
2. The STS3215 control table: every setting of a servo is a register (address, size in bytes); a few are
   sign-magnitude numbers (the sign is one bit, the rest is the magnitude). Three of them hold a calibration
   (`CALIBRATION_REGISTERS`).
3. `FeetechBus`: PING / READ / WRITE / SYNC_READ / SYNC_WRITE over pyserial, made robust against what real
   buses do (lost replies, corrupted bytes, a servo that is unplugged): every reply is read by exact byte
   count with a deadline, searched for its `FF FF` header, checked (checksum, id, length), and retried; what
   still fails raises a `FeetechError` that names the servo and what went wrong.

4. Servo setup: new servos all answer as id 1 at their factory baud rate, so an arm is set up one servo at a
   time (`find_single_servo`, `set_id_and_baud`): find it at any standard rate, write its id and 1 Mbaud
   through the EEPROM lock, check that it answers at the new id.

The servo side of the same protocol (status packets going out) is played by virtual_arm.py, which uses the
packet builders and the control table from here.
"""

import time
from dataclasses import dataclass

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
    """What a servo sends back: `FF FF id len error data… chk` (the servo's side, used by the virtual
    arm)."""
    body = bytes([servo_id, len(data) + 2, error]) + bytes(data)
    return HEADER + body + bytes([checksum(body)])


def ping_packet(servo_id):
    return instruction_packet(servo_id, PING)


def read_packet(servo_id, address, size):
    return instruction_packet(servo_id, READ, [address, size])


def write_packet(servo_id, address, data):
    return instruction_packet(servo_id, WRITE, bytes([address]) + bytes(data))


def sync_read_packet(address, size, servo_ids):
    """Broadcast `address, size, id1, id2, …`; the servos answer one after the other, in the listed
    order."""
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


_STS3215_REGISTERS = [
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
# name -> Register, in address order
CONTROL_TABLE = {reg.name: reg for reg in _STS3215_REGISTERS}

STS3215_MODEL_NUMBER = 777
# The Baud_Rate register's value for each standard rate (a new servo may arrive set to any of them).
BAUD_RATES = {1_000_000: 0, 500_000: 1, 250_000: 2, 128_000: 3, 115_200: 4, 57_600: 5, 38_400: 6, 19_200: 7}
RESOLUTION = 4096  # encoder ticks per turn
MAX_TICK = RESOLUTION - 1  # 4095, the "360°" of lerobot's degree formula

# Where a calibration lives in each servo's EEPROM: register -> the lerobot JSON field it holds (in write
# order).
CALIBRATION_REGISTERS = {
    "Homing_Offset": "homing_offset",
    "Min_Position_Limit": "range_min",
    "Max_Position_Limit": "range_max",
}


def register(name):
    """Look a register up by name, with a helpful error for typos."""
    try:
        return CONTROL_TABLE[name]
    except KeyError:
        raise KeyError(f"unknown STS3215 register {name!r}; known: {', '.join(CONTROL_TABLE)}") from None


def writable_register(name):
    """`register(name)` for a WRITE / SYNC_WRITE: the read-only ones (model number, live state) are
    refused."""
    reg = register(name)
    if reg.read_only:
        raise ValueError(f"{name} is read-only")
    return reg


def encode_sign_magnitude(value, sign_bit):
    """-5 with sign bit 11 -> 0x805: the sign in one bit, |value| in the bits below it."""
    magnitude = abs(int(value))
    if magnitude >= 1 << sign_bit:
        raise ValueError(f"{value} does not fit in {sign_bit} magnitude bits (max ±{(1 << sign_bit) - 1})")
    raw = magnitude
    if value < 0:
        raw |= 1 << sign_bit
    return raw


def decode_sign_magnitude(raw, sign_bit):
    """0x805 with sign bit 11 -> -5: the bits below the sign bit are |value|, the sign bit makes it
    negative."""
    magnitude = raw & ((1 << sign_bit) - 1)
    negative = (raw >> sign_bit) & 1
    if negative:
        return -magnitude
    return magnitude


def encode_value(reg, value):
    """A register value (signed where the register is) -> its little-endian bytes."""
    if reg.sign_bit is not None:
        raw = encode_sign_magnitude(value, reg.sign_bit)
    else:
        raw = int(value)
    if not 0 <= raw < 1 << (8 * reg.size):
        raise ValueError(f"{reg.name}: {value} does not fit in {reg.size} byte(s)")
    return raw.to_bytes(reg.size, "little")


def decode_value(reg, data):
    raw = int.from_bytes(data, "little")
    if reg.sign_bit is not None:
        return decode_sign_magnitude(raw, reg.sign_bit)
    return raw


# ------------------------------------------------------------------------------------------------------------
# 3. The bus
# ------------------------------------------------------------------------------------------------------------


class FeetechError(RuntimeError):
    """A servo did not answer, answered garbage, or reported an error, even after retries.

    `servo_id` is the (first) servo at fault, `failures` maps every failing id to what went wrong, and
    `partial` holds the values that a SYNC_READ did get right from the other servos.
    """

    def __init__(self, message, servo_id=None, failures=None, partial=None):
        super().__init__(message)
        self.servo_id = servo_id
        self.failures = failures or {}
        self.partial = partial or {}


def serial_ports() -> str:
    """The serial ports pyserial finds on this system (any OS), for an error message."""
    from serial.tools import list_ports

    names = sorted(port.device for port in list_ports.comports())
    return ", ".join(names) if names else "none"


class FeetechBus:
    """One serial port with Feetech servos on it (protocol 0, the STS/SMS series).

    Every transaction clears stale input, sends one packet, then reads status packets by exact byte counts
    until a deadline (`timeout` plus the time the expected bytes take on the wire). Failed transactions are
    retried `retries` times; a servo that reports error bits is not retried (that is its state, not a
    transmission fault). `names` ({id: "elbow_flex"}) only makes error messages friendlier.
    """

    def __init__(self, port, baudrate=1_000_000, timeout=0.05, retries=3, names=None):
        self.port = port
        self.baudrate = baudrate
        self.timeout = timeout
        self.retries = retries
        self.names = dict(names or {})
        try:
            self._serial = serial.Serial(port, baudrate=baudrate, timeout=timeout, write_timeout=1.0)
        except serial.SerialException as cause:
            raise FileNotFoundError(
                f"cannot open serial port {port!r} ({cause}); serial ports found: {serial_ports()}; "
                "check the USB cable, the port name (Linux /dev/ttyACM0, macOS /dev/tty.usbmodem…, "
                "Windows COM3) and that you may use it (Linux: group dialout)"
            ) from cause
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
        packet = read_packet(servo_id, reg.address, reg.size)
        data = self._transact(servo_id, packet, reg.size, f"READ {name}")
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
        values = {}  # {id: value} of every servo that answered
        failures = {}  # {id: what went wrong}
        pending = servo_ids  # the servos still to be heard from
        for _ in range(1 + self.retries):
            packet = sync_read_packet(reg.address, reg.size, pending)
            statuses, problems = self._exchange(packet, dict.fromkeys(pending, reg.size))
            for servo_id, status in statuses.items():
                if status.error:
                    failures[servo_id] = servo_error_message(status.error)
                values[servo_id] = decode_value(reg, status.data)
            pending = [servo_id for servo_id in pending if servo_id not in statuses]
            if not pending:
                break
        for servo_id in pending:
            failures[servo_id] = f"{problems[servo_id]} after {1 + self.retries} tries"
        if failures:
            good = {}  # what the servos without a fault did answer
            for servo_id in servo_ids:
                if servo_id in values and servo_id not in failures:
                    good[servo_id] = values[servo_id]
            raise self._error(f"SYNC_READ {name}", failures, partial=good)
        return {servo_id: values[servo_id] for servo_id in servo_ids}

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

    # -- transactions ----------------------------------------------------------------------------------------

    def _transact(self, servo_id, packet, reply_size, what):
        """Send one instruction packet to one servo and return the data of its status packet, retrying
        faults."""
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
        statuses = {}  # {id: Status} of the servos that answered
        problems = dict.fromkeys(expected, "no reply")  # {id: why its status is missing}
        while len(statuses) < len(expected):
            status, problem = self._next_status(deadline, max_data=max(expected.values()))
            if problem is not None:
                # A damaged packet: blame the servo its id byte names, if it is one we wait for.
                culprit, reason = problem
                if culprit in problems and culprit not in statuses:
                    problems[culprit] = reason
                elif len(expected) == 1:
                    only_servo = next(iter(expected))
                    problems[only_servo] = reason
                continue
            if status is None:
                break  # deadline
            # A valid packet that is not the one we wait for (a late answer to an earlier request): skip it.
            if status.servo_id not in expected or status.servo_id in statuses:
                continue
            expected_size = expected[status.servo_id]
            if len(status.data) != expected_size:
                problems[status.servo_id] = (f"reply with {len(status.data)} data bytes instead of "
                                             f"{expected_size}")
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
                if self._rx.endswith(b"\xff"):
                    del self._rx[:-1]
                else:
                    self._rx.clear()
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
            servo_id = self._rx[2]
            length = self._rx[3]  # counts the error byte, the data and the checksum
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
        """Read until `n` bytes are buffered or the deadline passes; replies may arrive in any number of
        pieces."""
        while len(self._rx) < n:
            if time.monotonic() >= deadline:
                return False
            self._rx += self._serial.read(max(n - len(self._rx), self._serial.in_waiting))
        return True

    def _send(self, packet):
        """Start a transaction: clear stale input, then send `packet` (remembered, to spot an adapter's
        echo)."""
        # A late reply to an earlier, timed-out request must not be mistaken for the answer to this one.
        self._serial.reset_input_buffer()
        self._rx.clear()
        self._serial.write(packet)
        self._echo = packet

    def _wire_time(self, n_bytes):
        return n_bytes * 10 / self.baudrate  # 8 data bits + start + stop bit per byte

    def _error(self, what, failures, partial=None):
        parts = [f"servo {servo_id}{self._name(servo_id)}: {reason}" for servo_id, reason in failures.items()]
        message = f"{what} on {self.port}: " + "; ".join(parts)
        return FeetechError(message, servo_id=next(iter(failures)), failures=failures, partial=partial)

    def _name(self, servo_id):
        """' (elbow_flex)' for a servo with a name, '' for one without."""
        if servo_id in self.names:
            return f" ({self.names[servo_id]})"
        return ""


# ------------------------------------------------------------------------------------------------------------
# 4. Servo setup: one servo on the bus gets its id and baud rate
# ------------------------------------------------------------------------------------------------------------


def find_single_servo(port, timeout=0.05):
    """The one servo connected to `port`, found by a broadcast PING at every standard baud rate.

    Returns (baud rate, id, model number). More than one servo answering is an error, so that a servo already
    set up and still connected is never renamed. (Servos that share an id and a rate answer at once: that
    collision cannot be told apart from one servo, so the walk asks for one servo at a time.)"""
    found = []  # (baud rate, id, model number) of every servo that answers
    for baudrate in BAUD_RATES:
        with FeetechBus(port, baudrate=baudrate, timeout=timeout, retries=1) as bus:
            for servo_id in bus.broadcast_ping():
                found.append((baudrate, servo_id, bus.read(servo_id, "Model_Number")))
    if len(found) != 1:
        # which servos answered, e.g. " (id 1 at 115200 baud, id 1 at 1000000 baud)"; nothing when none did
        answers = [f"id {servo_id} at {baudrate} baud" for baudrate, servo_id, _ in found]
        answered = ""
        if found:
            answered = f" ({', '.join(answers)})"
        raise FeetechError(f"{len(found)} servos answer on {port}{answered}: connect exactly one servo, "
                           "the one being set up, and check that the board is powered")
    return found[0]


def set_id_and_baud(port, servo_id, baudrate=1_000_000, model=STS3215_MODEL_NUMBER, timeout=0.05):
    """Give the one servo on `port` the id `servo_id` and the baud rate `baudrate`, kept across power-off.

    EEPROM registers are saved only while Lock = 0 (torque off). The servo acknowledges the new id under its
    old one and the new rate at its old rate, then takes them: what we send next uses the new ones. A servo
    of another model than `model` is left as it is. Returns what it was: (baud rate, id, model number)."""
    if baudrate not in BAUD_RATES:
        raise ValueError(f"{baudrate} is not a Feetech baud rate ({', '.join(map(str, BAUD_RATES))})")
    found = find_single_servo(port, timeout)
    found_baud, old_id, found_model = found
    if found_model != model:
        raise FeetechError(f"the servo on {port} (id {old_id}) is model {found_model}, not {model}: "
                           "is it the right servo?", old_id)
    with FeetechBus(port, baudrate=found_baud, timeout=timeout) as bus:
        bus.write(old_id, "Torque_Enable", 0)
        bus.write(old_id, "Lock", 0)
        bus.write(old_id, "ID", servo_id)
        bus.write(servo_id, "Baud_Rate", BAUD_RATES[baudrate])
    with FeetechBus(port, baudrate=baudrate, timeout=timeout) as bus:
        bus.write(servo_id, "Lock", 1)  # the check: it answers at its new id and rate
        if (bus.read(servo_id, "ID"), bus.read(servo_id, "Baud_Rate")) != (servo_id, BAUD_RATES[baudrate]):
            raise FeetechError(f"servo {servo_id} on {port} did not keep its new id and baud rate", servo_id)
    return found
