"""BMI control server: image catalogue, disks and (later) node provisioning."""
