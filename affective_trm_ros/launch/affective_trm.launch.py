"""Launch the whole suite: the encoder nodes of the chosen modalities, the fusion node and, on
request, the visualizer -- parameters from config/<node>.yaml with config/affective_trm.yaml on top.

    ros2 launch affective_trm_ros affective_trm.launch.py checkpoint:=/path/to/fusion.pt
    ros2 launch affective_trm_ros affective_trm.launch.py modalities:=video,audio visualizer:=true \
        namespace:=robot1 image_topic:=/camera/image_raw audio_topic:=/audio/audio device:=cuda

`ros2 launch affective_trm_ros affective_trm.launch.py --show-args` lists every argument.
Without `ros2 launch`, `affective-trm run` starts the same nodes from the same files in one process.
"""

from affective_trm_ros.system import system_launch_description


def generate_launch_description():
    return system_launch_description()
