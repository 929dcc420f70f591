"""Replay a rosbag through the suite on simulated time (real-time playback with `ros2 bag play`).

    ros2 launch affective_trm_ros replay.launch.py bag:=/path/to/session checkpoint:=fusion.pt \
        record:=/tmp/session_estimates

Starts the nodes with use_sim_time, waits start_delay_s for the models to load, plays the bag with
--clock and, with record:=DIR, records affect/valence_arousal. For an evaluation report with
back-pressure (no frame dropped, as fast as the nodes allow) use `affective-trm replay` instead.
"""

from affective_trm_ros.system import replay_launch_description


def generate_launch_description():
    return replay_launch_description()
