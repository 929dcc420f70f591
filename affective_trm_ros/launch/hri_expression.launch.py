"""Launch the ROS4HRI expression publisher (affect/valence_arousal -> /humans/faces/<id>/expression).

    ros2 launch affective_trm_ros hri_expression.launch.py [namespace:=robot1]

Needs hri_msgs (ros-<distro>-hri-msgs). `--show-args` lists every argument.
"""

from affective_trm_ros.system import node_launch_description


def generate_launch_description():
    return node_launch_description('hri_expression')
