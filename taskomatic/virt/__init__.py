"""Everything that talks to libvirt: connections, the fleet of hosts, errors."""
