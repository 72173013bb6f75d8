"""DiNAT and DiNAT_s come from the NAT code base and share its layout and converter."""

from attnseg.convert.nat import convert_state_dict, from_official, is_official, resize_rpb

__all__ = ["convert_state_dict", "from_official", "is_official", "resize_rpb"]
