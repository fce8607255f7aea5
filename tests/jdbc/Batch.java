// A JDBC executeBatch of sleeps, as applications load data: one Bind/Execute per row,
// one Sync for the whole batch. Args: JDBC URL, marker, then the sleeps in seconds.
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.Statement;

public class Batch {
    public static void main(String[] args) throws Exception {
        try (Connection connection = DriverManager.getConnection(args[0], "postgres", "")) {
            try (Statement setup = connection.createStatement()) {
                setup.execute("set log_min_duration_statement = 200");
                setup.execute("create temporary table batch_sink (n int)");
            }
            String sql = "insert into batch_sink select 1 from pg_sleep(?) /* " + args[1] + " */";
            try (PreparedStatement insert = connection.prepareStatement(sql)) {
                for (int i = 2; i < args.length; i++) {
                    insert.setDouble(1, Double.parseDouble(args[i]));
                    insert.addBatch();
                }
                insert.executeBatch();
            }
        }
    }
}
