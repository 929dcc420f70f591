"""Launch the audio encoder node (microphone -> affect/embedding/audio).

    ros2 launch affective_trm_ros audio_encoder.launch.py [config:=my_audio_encoder.yaml] [namespace:=robot1]

`ros2 launch affective_trm_ros audio_encoder.launch.py --show-args` lists every argument.
"""

from affective_trm_ros.system import node_launch_description


def generate_launch_description():
    return node_launch_description('audio_encoder')
