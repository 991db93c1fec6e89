"""The device selector of parameter-profile and upgrade jobs, as request bodies show it.

The body field is checked by :func:`chargegw.domain.device_selector.parse_selector`
(a 422 on ``selector`` naming what is wrong); the schema here documents the three forms.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import WithJsonSchema

from chargegw.domain.device_selector import MAX_DEVICE_TYPE

SELECTOR_SCHEMA: dict[str, Any] = {
    "title": "Selector",
    "description": "The devices a job acts on: a list of ids, the devices of a type code "
    "(optionally only those reporting `firmware`), or every device of the protocol.",
    "oneOf": [
        {
            "title": "DeviceIds",
            "type": "object",
            "properties": {
                "device_ids": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "minItems": 1,
                }
            },
            "required": ["device_ids"],
            "additionalProperties": False,
        },
        {
            "title": "DeviceType",
            "type": "object",
            "properties": {
                "device_type": {"type": "integer", "minimum": 0, "maximum": MAX_DEVICE_TYPE},
                "firmware": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
            "required": ["device_type"],
            "additionalProperties": False,
        },
        {
            "title": "AllDevices",
            "type": "object",
            "properties": {"all": {"const": True}},
            "required": ["all"],
            "additionalProperties": False,
        },
    ],
    "examples": [{"device_ids": ["04000001"]}, {"device_type": 39, "firmware": "312"}],
}

#: a selector as received (checked by ``parse_selector``)
SelectorBody = Annotated[Any, WithJsonSchema(SELECTOR_SCHEMA)]
