//! TODO(helper): acpi
