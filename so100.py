"""The SO-100/SO-101 follower arm: six Feetech servos become a robot with named joints, units and safety.

SmolVLA (arXiv 2506.01844, §4) was trained on community data recorded on the SO-100, a ~$100 arm of six
Feetech STS3215 servos. Those datasets do not hold encoder ticks: they hold each joint in lerobot's units
(degrees, or −100..100 of the joint's range, and 0..100 for the gripper), measured from a per-arm
calibration.
So a policy's state and actions mean something only on an arm calibrated and read exactly as lerobot does.
feetech.py speaks the servos' bus; this file turns it into that arm:

- the joints: `MOTOR_NAMES` (ids 1..6) and `STATE_NAMES`, the dataset order of state and action vectors;
- calibration: homing offsets and ranges, stored in lerobot's JSON format (`load_calibration`,
  `save_calibration`);
- units: `ticks_to_units` / `units_to_ticks`, raw encoder ticks <-> the dataset's units, with lerobot's
  formulas;
- `SO100Follower`: connect, configure and calibrate the servos, read the state, send actions with a per-step
  safety cap, and switch the torque off whatever happens;
- `SO100Leader`: the same arm with the torque off, moved by a person; its positions are the follower's goals;
- `setup_motors`: new servos all answer as id 1; give each its id and 1 Mbaud, one servo at a time;
- `default_calibration`: where an arm's calibration is (open_arm, below, opens a real arm or "sim", a
  `virtual_arm.VirtualArm` on a pseudo-terminal).

`python so100.py --port /dev/ttyACM0 setup-motors|scan|calibrate|read|move …` is the lab entry point
(`--leader` for the leader arm); `--port sim` runs everything against the virtual arm.
"""

import argparse
import atexit
import json
import os
import select
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import serial

from feetech import CALIBRATION_REGISTERS, MAX_TICK, STS3215_MODEL_NUMBER, set_id_and_baud
from feetech import FeetechBus, FeetechError  # also re-exported: users of the arm catch so100.FeetechError
from plumbing import DamagedFile, read_json
from toy_world import toy_world_cameras
from virtual_arm import VirtualArm

# ------------------------------------------------------------------------------------------------------------
# The joints, their calibration and their units
# ------------------------------------------------------------------------------------------------------------

MOTOR_NAMES = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]
MOTOR_IDS = {name: i + 1 for i, name in enumerate(MOTOR_NAMES)}  # shoulder_pan 1 … gripper 6
STATE_NAMES = [f"{name}.pos" for name in MOTOR_NAMES]  # the dataset order of state and action vectors
FULL_TURN_MOTOR = "wrist_roll"  # turns freely: its range is the whole encoder, not recorded

# Units of the joints (the gripper is always 0..100 = closed..open in the recorded range).
NORM_MODES = ("degrees", "range_m100_100")
# One motor's entry in a calibration file, in lerobot's format.
CALIBRATION_FIELDS = ("id", "drive_mode", "homing_offset", "range_min", "range_max")
# Calibration files live where lerobot keeps them, so a calibration made with lerobot loads as it is:
# $HF_LEROBOT_CALIBRATION, else $HF_LEROBOT_HOME/calibration, else ~/.cache/huggingface/lerobot/calibration.
_LEROBOT_HOME = Path(os.getenv("HF_LEROBOT_HOME", "~/.cache/huggingface/lerobot"))
_CALIBRATION_ROOT = Path(os.getenv("HF_LEROBOT_CALIBRATION", _LEROBOT_HOME / "calibration")).expanduser()
CALIBRATION_DIR = _CALIBRATION_ROOT / "robots" / "so_follower"
LEADER_CALIBRATION_DIR = _CALIBRATION_ROOT / "teleoperators" / "so_leader"  # lerobot's, for leader arms


def calibrate_command(port="PORT", leader=False, path=None):
    """The command (for hints) that calibrates the arm on `port` (a virtual arm's pty: sim) and saves it as
    `path`: NAME.json in the followers' or leaders' directory is --id NAME (the leaders': --leader), else
    --calibration."""
    port = str(port)
    if port.startswith("/dev/pts/"):
        port = "sim"  # a virtual arm's pseudo-terminal: the command that makes one is --port sim
    folder = None
    if path:
        folder = Path(path).parent
    if folder == LEADER_CALIBRATION_DIR:
        leader = True
    command = ["python", "so100.py", "--port", port]
    if leader:
        command.append("--leader")
    if folder in (CALIBRATION_DIR, LEADER_CALIBRATION_DIR):
        command += ["--id", Path(path).stem]  # NAME.json in a calibration directory is what --id NAME reads
    elif path:
        command += ["--calibration", str(path)]
    command.append("calibrate")
    return shlex.join(command)


def load_calibration(path_or_dict):
    """Read and check a calibration in lerobot's JSON format:
    `{"shoulder_pan": {"id": 1, "drive_mode": 0, "homing_offset": -710, "range_min": 758, "range_max": 3292},
    …}` (all six motors).
    """
    source = path_or_dict
    if isinstance(path_or_dict, (str, Path)):
        path = Path(path_or_dict).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no calibration file at {path}: run `{calibrate_command(path=path)}`")
        advice = f"run `{calibrate_command(path=path)}` to make it again"
        source = read_json(path, "calibration", advice=advice)
        try:
            return load_calibration(source)  # the checks below, each error then naming the file
        except ValueError as error:
            raise DamagedFile(path, f"is not a usable calibration ({error})", advice) from None
    if not isinstance(source, dict):
        raise ValueError(f"a calibration is a dict of motors, got {type(source).__name__}")
    calibration = {}
    for name in MOTOR_NAMES:
        entry = source.get(name)
        if not isinstance(entry, dict):
            raise ValueError(f"calibration has no entry for {name!r} (it has {list(source)}); expected "
                             "lerobot's format "
                             "{motor: {id, drive_mode, homing_offset, range_min, range_max}}")
        try:
            entry = {field: int(entry[field]) for field in CALIBRATION_FIELDS}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"calibration of {name!r} is incomplete or not integer: {e}") from None
        if entry["id"] != MOTOR_IDS[name]:
            raise ValueError(f"calibration says {name} has id {entry['id']}, "
                             f"the SO-100 uses {MOTOR_IDS[name]}")
        if entry["drive_mode"] != 0:
            raise ValueError(f"{name}: drive_mode {entry['drive_mode']} (inverted) is not used by the SO-100")
        if not 0 <= entry["range_min"] <= entry["range_max"] <= MAX_TICK:
            raise ValueError(f"{name}: range {entry['range_min']}..{entry['range_max']} "
                             f"is outside 0..{MAX_TICK}")
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
    """(range_min, range_max): two (6,) float64 arrays in the motors' order."""
    range_min = np.array([calibration[name]["range_min"] for name in MOTOR_NAMES], dtype=np.float64)
    range_max = np.array([calibration[name]["range_max"] for name in MOTOR_NAMES], dtype=np.float64)
    return [range_min, range_max]


def ticks_to_units(raw, calibration, norm_mode="degrees"):
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


def units_to_ticks(values, calibration, norm_mode="degrees"):
    """The inverse of `ticks_to_units`, to Goal_Position ticks (truncated to int, as lerobot does)."""
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


def _enter_pressed_now():
    """Was ENTER pressed (looked for during 50 ms)? The default `wait` of `calibrate`."""
    return _enter_pressed(0.05)


def _enter_pressed(seconds):
    """Wait up to `seconds` for the user to press ENTER (without blocking longer)."""
    if sys.platform == "win32":  # select() waits on sockets only there: poll the console instead
        import msvcrt

        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if msvcrt.kbhit() and msvcrt.getwch() in "\r\n":
                return True
            time.sleep(0.02)
        return False
    ready, _, _ = select.select([sys.stdin], [], [], seconds)
    if ready:
        sys.stdin.readline()
    return bool(ready)


# ------------------------------------------------------------------------------------------------------------
# The follower arm
# ------------------------------------------------------------------------------------------------------------


class SO100Follower:
    """The SO-100/SO-101 follower arm: six STS3215 servos, ids 1..6, in the dataset order.

    `calibration` is a path or dict in lerobot's format (None: only `calibrate()` is possible). States and
    actions are (6,) arrays in `norm_mode` units for the five joints and 0..100 for the gripper.
    `max_relative_target` (a number, 6 numbers, or {motor: number}) caps how far one action may move a joint
    from where it is, in the same units. Torque goes off on `disconnect()`, when leaving a `with` block for
    any reason (an exception, Ctrl-C), and at interpreter exit.
    """

    holds_pose = True  # torque on once connected and calibrated (a leader arm keeps it off)
    calibration_dir = CALIBRATION_DIR

    def __init__(self, port, calibration=None, norm_mode="degrees", max_relative_target=None,
                 timeout=0.05, retries=3, verbose=True):
        _check_norm_mode(norm_mode)
        self.port = port
        self.calibration = load_calibration(calibration) if calibration is not None else None
        self.norm_mode = norm_mode
        self.max_relative_target = max_relative_target
        self.timeout = timeout  # seconds to wait for a servo's answer
        self.retries = retries  # tries of a packet before a fault is raised
        self.verbose = verbose
        self.bus = None  # the FeetechBus while connected
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
                          f"(or run `{calibrate_command(self.port, not self.holds_pose)}`)")
                return self
            self._apply_calibration()
            if self.holds_pose:
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
        # SO100Follower(/dev/ttyACM0), or SO100Leader(…)
        return f"{type(self).__name__}({self.port})"

    # -- state and actions -----------------------------------------------------------------------------------

    def get_state(self):
        """Present joint positions, (6,) float32 in the dataset order and units."""
        return ticks_to_units(self.read_raw(), self._calibrated(), self.norm_mode)

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
        goal = np.clip(units_to_ticks(action, calibration, self.norm_mode), *_limits(calibration)).astype(int)
        self.bus.sync_write("Goal_Position", dict(zip(self.ids, goal.tolist())))
        return action.astype(np.float32)

    def units(self):
        joints = "degrees" if self.norm_mode == "degrees" else "-100..100 of the calibrated range"
        return f"{joints} for the joints, 0..100 for the gripper"

    @staticmethod
    def describe(state):
        readings = [f"{name}={value:+.1f}" for name, value in zip(STATE_NAMES, state)]
        return "  ".join(readings)

    # -- calibration -----------------------------------------------------------------------------------------

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
        show = wait is None  # a person at the keyboard: show the ranges as they grow
        if wait is None:
            wait = _enter_pressed_now
        self._disable_torque()  # connect() already put every servo in position mode

        prompt(f"Move {self} to the middle of its range of motion and press ENTER...")
        # Forget the old calibration so Present_Position reads the raw encoder, then centre each joint on
        # 2047.
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
            lo = np.minimum(lo, positions)
            hi = np.maximum(hi, positions)
            if show:
                ranges = []
                for name, low, now, high in zip(MOTOR_NAMES, lo, positions, hi):
                    ranges.append(f"{name}:{low}<{now}<{high}")
                print("  ".join(ranges), end="\r", flush=True)
            if wait():
                break
        if show:
            print()
        roll = MOTOR_NAMES.index(FULL_TURN_MOTOR)
        lo[roll] = 0
        hi[roll] = MAX_TICK
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
        if self.holds_pose:
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
        # half torque and current for the gripper: it stalls a lot
        self._write_eeprom({
            "Max_Torque_Limit": {gripper: 500},
            "Protection_Current": {gripper: 250},
            "Overload_Torque": {gripper: 25},
        })
        self._write_all("Maximum_Acceleration", 254)
        self._write_all("Acceleration", 254)

    def _apply_calibration(self, force=False):
        """Write the calibration to the servos unless they already hold it."""
        calibration = self._calibrated()
        # {register: its six values}, as the file says and as the servos hold them
        wanted = {}
        for register, key in CALIBRATION_REGISTERS.items():
            wanted[register] = [calibration[name][key] for name in MOTOR_NAMES]
        if not force:
            present = {}
            for register in CALIBRATION_REGISTERS:
                present[register] = [self.bus.read(servo_id, register) for servo_id in self.ids]
            if present == wanted:
                return
            # What each servo would read through the file's homing offsets (Present = actual − Homing_Offset),
            # wrapped to the encoder's one turn: a file made on another arm puts joints outside its ranges.
            through_file = self.read_raw() + present["Homing_Offset"] - wanted["Homing_Offset"]
            through_file = through_file % (MAX_TICK + 1)
            range_min, range_max = _limits(calibration)
            outside = []
            for name, ticks, low, high in zip(MOTOR_NAMES, through_file, range_min, range_max):
                # 200 ticks (~18°) of slack around the recorded range
                if not low - 200 <= ticks <= high + 200:
                    outside.append(f"{name} {ticks}")
            if outside:
                # the command that calibrates this arm under a name of its own
                its_own_file = self.calibration_dir / "NAME.json"
                this_arm = calibrate_command(self.port, not self.holds_pose, its_own_file)
                raise ValueError(f"{self}: the servos read {', '.join(outside)} through this calibration, "
                                 "outside its ranges: made on another arm? Not written. Calibrate this one "
                                 f"under its own name: {this_arm}")
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


class SO100Leader(SO100Follower):
    """The leader arm: the follower's six servos and calibration, with the torque off. A person moves it;
    read at the control rate (`get_state`), its positions, in the same units, are the follower's goals."""

    holds_pose = False
    calibration_dir = LEADER_CALIBRATION_DIR

    def send_action(self, action):
        raise RuntimeError(f"{self} is moved by hand: send actions to the follower")


def setup_motors(port, prompt=input):
    """Give new servos their ids (all answer as id 1): one servo connected at a time, the gripper first as the
    SO-100 assembly guide does; each is found at any baud rate and set to its id and 1 Mbaud."""
    for name in reversed(MOTOR_NAMES):
        prompt(f"Connect the controller board to the {name} servo only and press ENTER...")
        baudrate, old_id, _ = set_id_and_baud(port, MOTOR_IDS[name])
        print(f"{name}: id {old_id} at {baudrate} baud -> id {MOTOR_IDS[name]} at 1000000 baud")


def default_calibration(calibration, arm_id, virtual=None, directory=CALIBRATION_DIR):
    """`calibration` if given, else the virtual arm's own (its servos come calibrated), else the file
    `<directory>/<arm_id>.json` that `calibrate` writes for a real arm."""
    if calibration is not None:
        return calibration
    return virtual.calibration if virtual is not None else directory / f"{arm_id}.json"


# ------------------------------------------------------------------------------------------------------------
# Opening the robot: an arm (a real SO-100 on its serial port, or a fresh virtual one) and its cameras
# (USB cameras, or with a virtual arm the toy world's)
# ------------------------------------------------------------------------------------------------------------

class OpenCVCamera:
    """A USB camera (device index) or a video file, read as (H, W, 3) uint8 RGB frames. A thread takes the
    frames as the camera delivers them and `read()` returns the latest at once: a control loop never waits
    up to a frame period for the next one."""

    def __init__(self, index_or_path, width=640, height=480):
        import cv2

        self._cv2 = cv2
        self.source = index_or_path
        self._error = None  # what stopped the grabbing thread, raised by the next read()
        self._running = True  # the grabbing thread runs until close()
        self._capture = cv2.VideoCapture(index_or_path)
        if not self._capture.isOpened():
            raise FileNotFoundError(f"cannot open camera {index_or_path!r}: "
                                    "check `ls /dev/video*` or the path")
        self._capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        self._capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        self.width = width
        self.height = height
        self._latest = self._grab()
        (h, w) = self._latest.shape[:2]
        if (h, w) != (height, width):
            self.close()
            raise ValueError(f"camera {index_or_path!r} delivers {w}x{h} frames, not {width}x{height}: pass "
                             f"width={w}, height={h}")
        self._thread = threading.Thread(target=self._keep_grabbing, name=f"camera {index_or_path}",
                                        daemon=True)
        self._thread.start()

    def _grab(self):
        ok, bgr = self._capture.read()
        if not ok:
            raise RuntimeError(f"camera {self.source!r} returned no frame (unplugged, or end of the video)")
        return self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB)  # OpenCV delivers BGR; datasets are RGB

    def _keep_grabbing(self):
        try:
            while self._running:  # a new array each time: frames already handed out never change
                self._latest = self._grab()
        except RuntimeError as e:
            if os.path.isfile(str(self.source)):
                self._error = None  # the end of a video: its last frame stays
            else:
                self._error = e

    def read(self):
        if self._error:
            raise self._error
        return self._latest

    def close(self):
        self._running = False
        if hasattr(self, "_thread"):  # (not there when the size check in __init__ failed)
            self._thread.join()
        self._capture.release()


def open_cameras(sources, virtual_arm=None, scene=None, image_size=(64, 64)):
    """{key: device index, path or "sim"} (e.g. from infer_async.camera_sources) -> {key: camera}; "sim"
    cameras film the toy world (`scene`, or a new one of `image_size`) with `virtual_arm` in it."""
    simulated = [key for key, source in sources.items() if source == "sim"]
    if simulated and virtual_arm is None:
        raise ValueError("camera device 'sim' films the virtual arm: it needs --port sim")
    simulated_cameras = {}
    if simulated:
        simulated_cameras = toy_world_cameras(simulated, virtual_arm.joint_positions_deg, scene, image_size)
    cameras = {}
    for key, source in sources.items():
        if source == "sim":
            cameras[key] = simulated_cameras[key]
        elif source.isdigit():
            cameras[key] = OpenCVCamera(int(source))  # a device index: /dev/video<N>
        else:
            cameras[key] = OpenCVCamera(source)  # a device path or a video file
    return cameras


def open_arm(port, calibration=None, norm_mode="degrees", max_relative_target=None, arm_id="my_so100",
             verbose=True, leader=False, **sim_options):
    """(connected SO100Follower, or SO100Leader if `leader`; VirtualArm or None) on a real port
    (calibration: so100.py's <arm_id>.json by default) or on "sim", a fresh virtual arm (close it after the
    arm)."""
    arm_class = SO100Leader if leader else SO100Follower
    if sim_options and port != "sim":
        raise ValueError(f"options {sorted(sim_options)} only apply to --port sim")
    virtual = None
    if port == "sim":
        virtual = VirtualArm(**sim_options)
    calibration = default_calibration(calibration, arm_id, virtual, arm_class.calibration_dir)
    timeout = 0.05  # a real servo answers within microseconds
    if virtual is not None:
        port = virtual.port
        timeout = 0.3  # a thread plays the virtual servos: on a busy machine it may answer later
    try:
        arm = arm_class(port, calibration, norm_mode=norm_mode, verbose=verbose,
                        max_relative_target=max_relative_target, timeout=timeout)
        return arm.connect(), virtual
    except BaseException:
        if virtual is not None:
            virtual.close()
        raise


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(description="SO-100/SO-101 follower arm over the Feetech bus.")
    parser.add_argument("--port", required=True,
                        help="serial port (/dev/ttyACM0) or 'sim' for the virtual arm")
    parser.add_argument("--leader", action="store_true",
                        help=f"the leader arm (torque off; calibration in {LEADER_CALIBRATION_DIR})")
    parser.add_argument("--id", default="my_so100",
                        help="arm name: the calibration file is <id>.json (%(default)s)")
    parser.add_argument("--calibration", help=f"calibration JSON (default: {CALIBRATION_DIR}/<id>.json)")
    parser.add_argument("--norm-mode", default="degrees", choices=NORM_MODES,
                        help="joint units; must match the units the policy's dataset was recorded in "
                             "(%(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("calibrate",
                   help="record homing offsets and ranges, write them to the servos and the file")
    read = sub.add_parser("read", help="print the joint state")
    read.add_argument("--seconds", type=float, default=0,
                      help="keep printing for this long (0: once; %(default)s)")
    read.add_argument("--hz", type=float, default=10, help="readings per second (%(default)s)")
    move = sub.add_parser("move", help="move to a target (6 values, dataset order and units)")
    move.add_argument("target", type=float, nargs=6, metavar="VALUE")
    move.add_argument("--max-step", type=float, default=5.0,
                      help="largest change per step (units of the mode; %(default)s)")
    move.add_argument("--hz", type=float, default=30, help="steps per second (%(default)s)")
    move.add_argument("--seconds", type=float, default=10, help="give up after this long (%(default)s)")
    sub.add_parser("scan", help="list the servos that answer a broadcast PING, with their model numbers")
    sub.add_parser("setup-motors",
                   help="give new servos their ids and 1 Mbaud, one at a time (gripper first)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "hz", 1) <= 0 or getattr(args, "seconds", 0) < 0:
        parser.error("--hz must be positive and --seconds not negative")
    if args.port == "sim" and args.calibration:
        real_arms_directories = {CALIBRATION_DIR.resolve(), LEADER_CALIBRATION_DIR.resolve()}
        if Path(args.calibration).resolve().parent in real_arms_directories:
            parser.error("the virtual arm's calibration never goes where real arms' files are: "
                         "choose another --calibration")
    virtual = None
    if args.port == "sim":
        # setup-motors meets new servos (all answering as id 1); the other commands a calibrated arm
        virtual = VirtualArm(factory_new=args.command == "setup-motors")
    arm_class = SO100Follower
    if args.leader:
        arm_class = SO100Leader
    try:
        port = args.port
        if virtual is not None:
            port = virtual.port
        if args.command == "scan":
            scan(port)
            return
        if args.command == "setup-motors":
            connect_one_servo = input  # a person plugs in one servo at a time and presses ENTER
            if virtual is not None:
                connect_one_servo = virtual.setup_hand()
            setup_motors(port, connect_one_servo)
            return
        # calibrate makes the calibration (and saves it where read and move will look for it)
        calibrating = args.command == "calibrate"
        directory = arm_class.calibration_dir
        calibration = None
        if not calibrating:
            calibration = default_calibration(args.calibration, args.id, virtual, directory)
        with arm_class(port, calibration, norm_mode=args.norm_mode) as arm:
            if calibrating:
                calibrate_and_save(arm, args, virtual, directory)
            elif args.command == "read":
                print_state(arm, args.seconds, args.hz)
            elif args.command == "move":
                move_to(arm, np.array(args.target), args.max_step, args.hz, args.seconds)
    except KeyboardInterrupt:
        print("\ninterrupted: torque off")
    finally:
        if virtual is not None:
            virtual.close()


def calibrate_and_save(arm, args, virtual, directory):
    """so100.py calibrate: on a real arm you move the joints and the result goes to <id>.json (or
    --calibration); on the virtual arm a scripted "hand" moves them, and the result stays in its servos (or
    goes to --calibration), never into a real arm's <id>.json."""
    if virtual is not None:
        prompt, wait = virtual.calibration_hand()
        save_to = args.calibration
    else:
        prompt = input
        wait = None  # ENTER ends the moving through the ranges
        save_to = default_calibration(args.calibration, args.id, None, directory)
    arm.calibrate(prompt=prompt, wait=wait, save_to=save_to)
    print(json.dumps(arm.calibration, indent=4))


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
    end = now + seconds
    moved_at = now  # when a joint last moved more than 0.05 units
    previous = arm.get_state()
    while now < end and now - moved_at < 0.5:
        arm.send_action(target)
        time.sleep(1 / hz)
        state = arm.get_state()
        now = time.monotonic()
        if np.abs(state - previous).max() > 0.05:
            moved_at = now
        previous = state
    print(arm.describe(arm.get_state()))


if __name__ == "__main__":
    # `kill` (SIGTERM) unwinds like Ctrl-C: the `with` block switches the torque off either way.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        main()
    except (FeetechError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")  # the message says what is wrong and what to do; the torque is already off
