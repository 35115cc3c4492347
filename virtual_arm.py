"""A virtual SO-100: six simulated STS3215 servos answering the Feetech protocol on a pseudo-terminal.

Classes without an arm still need the whole deploy path (SmolVLA paper §3.3 runs the policy against a real
SO-100). `VirtualArm` opens a pty pair (os.openpty): the driver opens the slave side (`sim.port`, e.g.
/dev/pts/7) exactly like a USB serial adapter, and a background thread on the master side plays the servos:

- one register memory per servo, laid out as the STS3215 control table (model number 777, limits, PID, …);
- Present_Position = actual − Homing_Offset (wrapped to one turn unless Phase bit 4 asks for multi-turn);
- with Torque_Enable = 1 the position moves toward Goal_Position (clamped to the position limits) at a
  maximum speed; with torque off the joints stay where a "hand" (`move_joint`, `calibration_hand`) puts them;
- EEPROM registers (addresses below 40) survive `power_cycle()` only if written while Lock = 0;
- a servo hears only instructions sent at its own baud rate (the Baud_Rate register; the pty carries the
  rate the driver set) and answers to its ID register, so servo setup (feetech.set_id_and_baud) runs end to
  end on servos fresh from the box (`factory_new=True`: all id 1 at 115200) plugged in one at a time;
- fault injection, for testing the driver's robustness: drop a reply, corrupt its checksum, delay it, send it
  in fragments, precede it with garbage, report error bits, or remove a servo from the bus.

The physical arm has mechanical stops and a "true" calibration (`sim.calibration`, lerobot's JSON format).
The servos start with it written to their EEPROM, so `--port sim` works without calibrating first. The true
pose (`joint_positions_deg`, what the synthetic camera draws) is defined here from that calibration alone, so
the driver's conversion of ticks to units (so100.py) can be checked against it. This file speaks only the
protocol (feetech.py) and knows nothing of the driver: the joints are the calibration's, in its order.
A pty moves bytes as fast as the two threads pass them, whatever baud rate the driver set.
For recording without hardware, toy_world.py's `ScriptedHand` moves a virtual leader arm and its cameras film
the arm; this file imports none of it.
"""

import os
import select
import struct
import sys
import threading
import time

try:  # a pseudo-terminal's settings: POSIX only (Linux, macOS); Windows has no pty, so no `--port sim` there
    import fcntl
    import termios
    import tty
except ImportError:
    fcntl = None
    termios = None
    tty = None

import numpy as np

from feetech import (
    BAUD_RATES, BROADCAST_ID, CALIBRATION_REGISTERS, CONTROL_TABLE, HEADER, MAX_TICK, PING, READ, RESOLUTION,
    STS3215_MODEL_NUMBER, SYNC_READ, SYNC_WRITE, WRITE, checksum, decode_value, encode_value, status_packet,
)

# The virtual arm's physical truth, in lerobot's calibration format and in the arm's joint order (ids 1..6,
# the gripper last): where the middle pose is (homing_offset + 2047 raw ticks) and where the mechanical stops
# are (range + homing_offset). A joint whose range is the whole turn (0..MAX_TICK, here wrist_roll) has no
# stops: it turns freely.
TRUE_CALIBRATION = {
    "shoulder_pan": {"id": 1, "drive_mode": 0, "homing_offset": -710, "range_min": 758, "range_max": 3292},
    "shoulder_lift": {"id": 2, "drive_mode": 0, "homing_offset": 800, "range_min": 820, "range_max": 3210},
    "elbow_flex": {"id": 3, "drive_mode": 0, "homing_offset": -700, "range_min": 860, "range_max": 3090},
    "wrist_flex": {"id": 4, "drive_mode": 0, "homing_offset": 310, "range_min": 870, "range_max": 3240},
    "wrist_roll": {"id": 5, "drive_mode": 0, "homing_offset": -420, "range_min": 0, "range_max": 4095},
    "gripper": {"id": 6, "drive_mode": 0, "homing_offset": -1500, "range_min": 2030, "range_max": 3500},
}

# Factory settings of an STS3215 (what a new servo reads); unlisted registers read 0.
FACTORY_DEFAULTS = {
    "Firmware_Major_Version": 3,
    "Firmware_Minor_Version": 10,
    "Model_Number": STS3215_MODEL_NUMBER,
    "Return_Delay_Time": 250,
    "Response_Status_Level": 1,
    "Min_Position_Limit": 0,
    "Max_Position_Limit": MAX_TICK,
    "Max_Temperature_Limit": 70,
    "Max_Voltage_Limit": 140,
    "Min_Voltage_Limit": 40,
    "Max_Torque_Limit": 1000,
    "Unloading_Condition": 44,
    "LED_Alarm_Condition": 47,
    "P_Coefficient": 32,
    "D_Coefficient": 32,
    "Protection_Current": 500,
    "Angular_Resolution": 1,
    "Protective_Torque": 20,
    "Protection_Time": 200,
    "Overload_Torque": 80,
    "Torque_Limit": 1000,
    "Lock": 1,
    "Present_Voltage": 74,
    "Present_Temperature": 28,
}
EEPROM_END = 40  # addresses below this are EEPROM


def _read_only_addresses():
    """Every byte address that belongs to a read-only register."""
    addresses = set()
    for reg in CONTROL_TABLE.values():
        if reg.read_only:
            addresses.update(range(reg.address, reg.address + reg.size))
    return addresses


def _termios_rates():
    """{termios speed constant: baud rate} for the standard rates this system has a constant for."""
    rates = {}
    for rate in BAUD_RATES:
        if hasattr(termios, f"B{rate}"):
            rates[getattr(termios, f"B{rate}")] = rate
    return rates


# Bytes the instruction WRITE may not change: the read-only registers.
PROTECTED = _read_only_addresses()
# The pty's speed setting (termios) -> baud rate. 250000 and 128000 have no constant on Linux: a driver sets
# them as a custom rate, shown as BOTHER, whose value only struct termios2 holds (c_ospeed, via TCGETS2).
TERMIOS_RATES = _termios_rates()
BOTHER = 0o010000  # the speed setting of a custom rate (Linux)
TCGETS2 = 0x802C542A  # the ioctl that reads a struct termios2 (Linux)
NO_PTY = ("--port sim needs a pseudo-terminal (os.openpty), which this system does not have (Windows): "
          "run it under WSL, or drive a real arm (--port COM3, or the port your adapter shows)")


def pty_unsupported() -> str | None:
    """Why this system cannot host the virtual arm's pty, or None where it can."""
    if termios is None or not hasattr(os, "openpty"):
        return NO_PTY
    return None


def driver_baudrate(fd):
    """The baud rate the driver set on its side of the pty `fd` (on macOS a speed setting is the rate
    itself)."""
    speed = termios.tcgetattr(fd)[5]
    if speed == BOTHER and sys.platform == "linux":
        # struct termios2: 4 flag words, c_line, c_cc[19], c_ispeed, c_ospeed (the unsigned int at byte 40)
        termios2 = fcntl.ioctl(fd, TCGETS2, bytes(44))
        return struct.unpack_from("I", termios2, 40)[0]
    return TERMIOS_RATES.get(speed, speed)


# The Baud_Rate register's value -> baud rate.
BAUD_RATES_BY_VALUE = {value: rate for rate, value in BAUD_RATES.items()}
# Each kind of fault, with its parameters (a default of None means the parameter is required). The default
# garbage hides a false header (FF FF 07 42: "servo 7, 66 bytes follow") that a driver must not trust.
FAULT_KINDS = {
    "drop": {},
    "corrupt": {},
    "delay": {"seconds": None},
    "fragment": {"gap": 0.001},
    "garbage": {"data": b"\x00\xff\x13\xff\xff\x07\x42"},
    "error_bits": {"bits": None},
    "missing": {},
}


def _turns_freely(truth):
    """A joint calibrated over the whole turn (0..MAX_TICK) has no mechanical stops."""
    return (truth["range_min"], truth["range_max"]) == (0, MAX_TICK)


def _mechanical_stops(truth):
    """(lowest, highest) raw tick a joint can reach: its calibrated range shifted by its homing offset; None
    for a joint that turns freely."""
    if _turns_freely(truth):
        return None
    lowest = truth["range_min"] + truth["homing_offset"]
    highest = truth["range_max"] + truth["homing_offset"]
    return (lowest, highest)


def _send_time(queued_reply):
    """The send time of an outbox entry (send time, bytes)."""
    return queued_reply[0]


class VirtualServo:
    """One STS3215: its register memory, its EEPROM copy ("flash"), and its physical position."""

    def __init__(self, servo_id, actual, stops):
        self.regs = bytearray(90)
        for name, value in FACTORY_DEFAULTS.items():
            self.set(name, value)
        self.set("ID", servo_id)
        self.actual = float(actual)  # raw encoder ticks of the physical joint, 0..4095
        self.stops = stops  # (lowest, highest) raw tick the joint can physically reach, or None: turns freely
        self.set("Goal_Position", self.present())
        self.save_eeprom()

    def save_eeprom(self):
        """Copy the EEPROM registers to flash: what power_cycle() brings back."""
        self.flash = bytes(self.regs[:EEPROM_END])

    def get(self, name):
        reg = CONTROL_TABLE[name]
        return decode_value(reg, self.regs[reg.address: reg.address + reg.size])

    def set(self, name, value):
        reg = CONTROL_TABLE[name]
        self.regs[reg.address: reg.address + reg.size] = encode_value(reg, value)

    def present(self):
        """Present_Position = actual − Homing_Offset, on one turn unless Phase bit 4 (multi-turn) is set."""
        position = round(self._present_exact())
        if self.get("Phase") & 0x10:  # multi-turn: any number of ticks
            return position
        # wrap again: 4095.6 rounds up to 4096, which a one-turn reading shows as 0
        return position % RESOLUTION

    def _present_exact(self):
        position = self.actual - self.get("Homing_Offset")
        if self.get("Phase") & 0x10:  # multi-turn: any number of ticks
            return position
        return position % RESOLUTION

    def write(self, address, data):
        """The WRITE instruction: EEPROM bytes reach the flash only while Lock = 0."""
        for k, byte in enumerate(data):
            if address + k not in PROTECTED and address + k < len(self.regs):
                self.regs[address + k] = byte
        if address < EEPROM_END and self.get("Lock") == 0:
            self.save_eeprom()

    def read(self, address, size):
        self.set("Present_Position", self.present())
        return bytes(self.regs[address: address + size])

    def hears(self, servo_id, baudrate):
        """Whether an instruction to `servo_id` sent at `baudrate` reaches this servo (the broadcast id
        does)."""
        addressed = servo_id in (BROADCAST_ID, self.get("ID"))
        return addressed and baudrate == BAUD_RATES_BY_VALUE[self.get("Baud_Rate")]

    def move_by_hand(self, actual):
        """Put the joint somewhere by hand (it can't go past its mechanical stops)."""
        if self.stops is None:
            self.actual = float(actual) % RESOLUTION
        else:
            self.actual = float(np.clip(actual, *self.stops))

    def step(self, dt, speed):
        """Advance the motor by `dt` seconds: toward the goal at most `speed` ticks/s, if torque is on."""
        if not self.get("Torque_Enable"):
            self.set("Present_Velocity", 0)
            self.set("Moving", 0)
            return
        low = self.get("Min_Position_Limit")
        high = self.get("Max_Position_Limit")
        goal = self.get("Goal_Position")
        if high > low:  # limits that are not a proper range (e.g. both 0) limit nothing
            goal = np.clip(goal, low, high)
        error = goal - self._present_exact()
        move = float(np.clip(error, -speed * dt, speed * dt))
        self.move_by_hand(self.actual + move)
        velocity = 0
        if dt > 0:
            velocity = round(move / dt)
        self.set("Present_Velocity", velocity)
        self.set("Moving", int(abs(error) > 1))

    def power_cycle(self):
        """Power off and on: EEPROM comes back from flash, RAM is reset (torque off, locked)."""
        self.regs[:EEPROM_END] = self.flash
        self.set("Torque_Enable", 0)
        self.set("Lock", 1)
        self.set("Goal_Position", self.present())


class VirtualArm:
    """Six virtual STS3215 servos (ids 1..6) behind a pty; `sim.port` is the serial port to open.

    calibrated: start with TRUE_CALIBRATION in the servos' EEPROM (else factory settings: offset 0, 0..4095).
    pose: the starting pose (6,) in the units of `joint_positions_deg` (default: joints centred, gripper half
        open, sim.HOME_DEG).
    speed: the servos' maximum speed in ticks/s (4096 ticks = one turn).
    tick: seconds between the servo thread's motor updates (it also wakes at once for an instruction).
    factory_new: the servos as they come out of the box (all id 1 at 115200 baud, not calibrated), for setup.
    """

    def __init__(self, calibrated=True, pose=(0, 0, 0, 0, 0, 50), speed=2400.0, tick=0.002,
                 factory_new=False):
        reason = pty_unsupported()
        if reason is not None:
            raise ValueError(reason)
        self.calibration = {name: dict(entry) for name, entry in TRUE_CALIBRATION.items()}
        self.speed = speed
        self.tick = tick
        self.servos = {}
        for name, truth in self.calibration.items():
            middle = truth["homing_offset"] + MAX_TICK // 2  # raw ticks of the middle pose
            servo = VirtualServo(truth["id"], middle, _mechanical_stops(truth))
            if calibrated and not factory_new:
                for reg, key in CALIBRATION_REGISTERS.items():
                    servo.set(reg, truth[key])
            if factory_new:  # as the servos come out of the box (the classroom: id 1 at 115200)
                servo.set("ID", 1)
                servo.set("Baud_Rate", BAUD_RATES[115_200])
            servo.save_eeprom()
            # keyed by the joint's place in the arm; its ID register may differ
            self.servos[truth["id"]] = servo
        self.plugged_in = set(self.servos)  # the servos wired to the bus (setup connects them one at a time)
        self._faults = []
        self._outbox = []  # (send time, bytes) of replies waiting to go out
        self._lock = threading.RLock()
        self._master, self._slave = os.openpty()
        # Raw mode: no echo, no line editing, no CR/LF translation; the bytes pass through untouched.
        tty.setraw(self._slave)
        self.port = os.ttyname(self._slave)
        for name, value in zip(self.calibration, pose):
            self.move_joint(name, value)
        for servo in self.servos.values():
            servo.set("Goal_Position", servo.present())
        self._running = True
        self._thread = threading.Thread(target=self._serve, name="virtual-arm", daemon=True)
        self._thread.start()

    # -- the physical arm ------------------------------------------------------------------------------------

    # The simulator's ground truth for the pose, defined here from the true calibration alone: each joint in
    # degrees from the middle of its calibrated range, (present − (range_min + range_max)/2)·360/MAX_TICK,
    # and the gripper (the last joint) in 0..100 % of its range (closed..open). A calibrated driver reading
    # in degrees mode must agree: the tests check so100.ticks_to_units against this independent definition.

    def joint_positions_deg(self):
        """The true pose (6,) in the arm's joint order: degrees from the middle of each joint's range, the
        gripper 0..100; for the synthetic camera and the tests."""
        with self._lock:
            ticks = [self._true_present(name) for name in self.calibration]
        positions = []
        for name, present in zip(self.calibration, ticks):
            positions.append(self._degrees_or_percent(name, present))
        return np.array(positions)

    def move_joint(self, name, value):
        """Move a joint by hand to `value` (units of joint_positions_deg); mechanical stops hold it back."""
        truth = self.calibration[name]
        low = truth["range_min"]
        high = truth["range_max"]
        if self._is_gripper(name):
            present = np.clip(value, 0, 100) / 100 * (high - low) + low
        else:
            present = value * MAX_TICK / 360 + (low + high) / 2
        self._move_to_present(name, int(present))  # whole ticks, truncated, as a driver's goal would be

    def _degrees_or_percent(self, name, present):
        truth = self.calibration[name]
        low = truth["range_min"]
        high = truth["range_max"]
        if self._is_gripper(name):
            return (np.clip(present, low, high) - low) / (high - low) * 100
        return (present - (low + high) / 2) * 360 / MAX_TICK

    def _is_gripper(self, name):
        return name == list(self.calibration)[-1]

    def _true_present(self, name):
        # What Present_Position reads with the true calibration, whatever the registers hold now.
        truth = self.calibration[name]
        return (self.servos[truth["id"]].actual - truth["homing_offset"]) % RESOLUTION

    def _move_to_present(self, name, present):
        """Move a joint by hand so that it reads `present` ticks under the true calibration."""
        truth = self.calibration[name]
        with self._lock:
            self.servos[truth["id"]].move_by_hand(present + truth["homing_offset"])

    def calibration_hand(self):
        """(prompt, wait) callbacks for `SO100Follower.calibrate` that move the joints like a person would:
        the prompt puts the arm in its middle pose, then each `wait()` call takes one step of a sweep that
        pushes every joint that has stops against both of them and back (a freely turning joint's range is
        the whole turn, nothing to record); it returns True when done."""
        sweep = []  # (joint, degrees) to move to, one per wait() call
        for name, truth in self.calibration.items():
            if _turns_freely(truth):
                continue
            for degrees in (-90, -180, 90, 180, 0):
                sweep.append((name, degrees))
        steps = iter(sweep)

        def prompt(message):
            for name in self.calibration:
                self._move_to_present(name, MAX_TICK // 2)  # the middle pose reads 2047

        def wait():
            step = next(steps, None)
            if step is None:
                return True
            self.move_joint(*step)
            return False

        return prompt, wait

    def setup_hand(self):
        """A `prompt` callback for servo setup (so100.setup_motors) that does what the student is asked:
        before each prompt, only the next servo is wired to the bus, in the order asked (the gripper
        first)."""
        order = iter(reversed(list(self.servos)))

        def prompt(message):
            with self._lock:
                self.plugged_in = {next(order)}

        return prompt

    def power_cycle(self):
        with self._lock:
            for servo in self.servos.values():
                servo.power_cycle()

    # -- faults ----------------------------------------------------------------------------------------------

    def inject(self, kind, servo_id=None, times=1, **params):
        """Make the next `times` replies of `servo_id` (None: any servo) go wrong; times=None: until cleared.

        kinds: "drop" (no reply), "corrupt" (bad checksum), "delay" (seconds=…), "fragment" (sent in
        1-byte pieces, gap=… s apart), "garbage" (data=… bytes before the reply), "error_bits" (bits=…,
        e.g. 0x20 overload), "missing" (the servo is off the bus: it neither answers nor executes anything;
        lasts until `clear_faults()`, whatever `times` says).
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; choose from {list(FAULT_KINDS)}")
        allowed = FAULT_KINDS[kind]
        unknown = set(params) - set(allowed)
        missing = []  # the required parameters not given
        for parameter, default in allowed.items():
            if default is None and parameter not in params:
                missing.append(parameter)
        if unknown or missing:
            raise ValueError(f"fault {kind!r} takes {list(allowed) or 'no parameters'}; "
                             f"unknown {sorted(unknown)}, missing {missing}")
        # the fault's record: what, for whom, how often, then its parameters (the defaults, then the given)
        fault = {"kind": kind, "servo_id": servo_id, "times": times}
        fault.update(allowed)
        fault.update(params)
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self):
        with self._lock:
            self._faults.clear()

    def _take_fault(self, kind, servo_id):
        """The parameters of an active fault of this kind for this servo, using up one of its times."""
        for fault in self._faults:
            if fault["kind"] == kind and fault["servo_id"] in (None, servo_id):
                if fault["times"] is not None:
                    fault["times"] -= 1
                    if fault["times"] == 0:
                        self._faults.remove(fault)
                return fault
        return None

    def _is_missing(self, servo_id):
        for fault in self._faults:
            if fault["kind"] == "missing" and fault["servo_id"] in (None, servo_id):
                return True
        return False

    # -- the bus ---------------------------------------------------------------------------------------------

    def _serve(self):
        """The servo side of the bus: read instructions, answer them, move the motors, until closed."""
        received = bytearray()
        last = time.monotonic()
        while self._running:
            ready, _, _ = select.select([self._master], [], [], self.tick)
            if ready:
                try:
                    received += os.read(self._master, 4096)
                except OSError:  # the pty is being closed
                    return
            with self._lock:
                now = time.monotonic()
                for servo in self.servos.values():
                    servo.step(now - last, self.speed)
                last = now
                for servo_id, instruction, params in self._instructions(received):
                    self._execute(servo_id, instruction, params, now)
                self._send_due(now)

    @staticmethod
    def _instructions(buffer):
        """Cut complete instruction packets out of `buffer`; skip noise and packets with bad checksums."""
        while True:
            start = buffer.find(HEADER)
            if start < 0:
                # keep only a trailing FF: it may be the first half of a header
                if buffer.endswith(b"\xff"):
                    del buffer[:-1]
                else:
                    buffer.clear()
                return
            del buffer[:start]
            if len(buffer) >= 3 and buffer[2] == 0xFF:
                del buffer[0]
                continue
            if len(buffer) < 4 or len(buffer) < 4 + buffer[3]:
                return  # wait for the rest
            length = buffer[3]
            packet = bytes(buffer[: 4 + length])
            if length < 2 or checksum(packet[2:-1]) != packet[-1]:
                del buffer[:2]  # a real servo ignores a damaged packet
                continue
            del buffer[: 4 + length]
            yield packet[2], packet[4], packet[5:-1]

    def _execute(self, servo_id, instruction, params, now):
        baudrate = driver_baudrate(self._master)
        # the servos on the bus that hear this instruction: (their id on the bus, servo)
        targets = []
        for slot, servo in self.servos.items():
            if slot in self.plugged_in and not self._is_missing(slot) and servo.hears(servo_id, baudrate):
                targets.append((servo.get("ID"), servo))
        if instruction == PING:
            for bus_id, servo in targets:
                self._reply(bus_id, b"", now)
        elif instruction == READ and servo_id != BROADCAST_ID and len(params) == 2:
            for bus_id, servo in targets:
                self._reply(bus_id, servo.read(params[0], params[1]), now)
        elif instruction == WRITE and len(params) >= 2:
            for bus_id, servo in targets:
                servo.write(params[0], params[1:])
                if servo_id != BROADCAST_ID:
                    self._reply(bus_id, b"", now)
        elif instruction == SYNC_READ and servo_id == BROADCAST_ID and len(params) >= 2:
            address = params[0]
            size = params[1]
            for wanted in params[2:]:  # in the listed order, each servo its own status packet
                for bus_id, servo in targets:
                    if bus_id == wanted:
                        self._reply(bus_id, servo.read(address, size), now)
        elif instruction == SYNC_WRITE and servo_id == BROADCAST_ID and len(params) >= 2:
            address = params[0]
            size = params[1]
            blocks = self._sync_write_blocks(params, size)
            # each servo takes its own block (a new ID takes effect after the packet)
            for bus_id, servo in targets:
                for wanted, data in blocks:
                    if wanted == bus_id:
                        servo.write(address, data)

    @staticmethod
    def _sync_write_blocks(params, size):
        """SYNC_WRITE's `address, size, (id, data…)…` -> [(id, data)], one block per listed servo."""
        blocks = []
        for k in range(2, len(params) - size, size + 1):
            blocks.append((params[k], params[k + 1: k + 1 + size]))
        return blocks

    def _reply(self, servo_id, data, now):
        """Queue a status packet, bent by whatever faults are active for this servo."""
        error = self._take_fault("error_bits", servo_id)
        error_byte = 0
        if error:
            error_byte = error["bits"]
        packet = bytearray(status_packet(servo_id, error_byte, data))
        if self._take_fault("drop", servo_id):
            return
        if self._take_fault("corrupt", servo_id):
            packet[-1] ^= 0x5A
        garbage = self._take_fault("garbage", servo_id)
        if garbage:
            packet[:0] = garbage["data"]
        delay = self._take_fault("delay", servo_id)
        at = now  # when the reply goes out
        if delay:
            at = now + delay["seconds"]
        fragment = self._take_fault("fragment", servo_id)
        if fragment:
            for k, byte in enumerate(packet):
                self._outbox.append((at + k * fragment["gap"], bytes([byte])))
        else:
            self._outbox.append((at, bytes(packet)))

    def _send_due(self, now):
        """Write out the queued replies whose send time has come, earliest first."""
        self._outbox.sort(key=_send_time)
        while self._outbox and _send_time(self._outbox[0]) <= now:
            _, data = self._outbox.pop(0)
            os.write(self._master, data)

    # -- lifetime --------------------------------------------------------------------------------------------

    def close(self):
        if not self._running:
            return
        self._running = False
        self._thread.join()
        os.close(self._master)
        os.close(self._slave)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
