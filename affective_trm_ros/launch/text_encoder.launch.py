"""Launch the text encoder node (speech text -> affect/embedding/text).

    ros2 launch affective_trm_ros text_encoder.launch.py [config:=my_text_encoder.yaml] [namespace:=robot1]

`ros2 launch affective_trm_ros text_encoder.launch.py --show-args` lists every argument.
"""

from affective_trm_ros.system import node_launch_description


def generate_launch_description():
    return node_launch_description('text_encoder')
